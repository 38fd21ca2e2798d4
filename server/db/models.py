"""peewee models: the tables of the store.

Layout, following the reference engine (see ../shared/reference/bk-sops.md §3):

- ``project``: a business (``bk_biz_id`` set: it comes from CMDB) or a bare project.
- ``task``: one run of a flow, in one project.
- ``node``: one node of a task at any sub-process depth, its current state and
  data; ``state`` is NULL for a node that has not run. Sub-process children point
  at their parent by node id, so a whole task can be bulk-inserted in one pass.
- ``attempt``: one earlier attempt of a node (a retry, a skip, a loop's final run).
- ``component_schema``: the declared outputs of one plugin code at one version.
- ``schema_version``: the migration level of the database (server/db/migrations.py).
- ``app``, ``app_grant``, ``user_token``: who may call, which businesses each app may
  read, and the bk_tokens the command line issued.

Times are integer microseconds since the Unix epoch (UTC): exact and identical on
every database. JSON values are text written by ``server.values.dumps``.
"""

from __future__ import annotations

from peewee import BigAutoField
from peewee import BigIntegerField
from peewee import BooleanField
from peewee import CharField
from peewee import DatabaseProxy
from peewee import ForeignKeyField
from peewee import IntegerField
from peewee import Model
from peewee import TextField

database = DatabaseProxy()


class JsonTextField(TextField):
    """JSON text of any size: TEXT on SQLite and PostgreSQL, LONGTEXT on MySQL."""

    field_type = "JSONTEXT"


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Project(BaseModel):
    id = BigIntegerField(primary_key=True)
    name = CharField(max_length=255)
    #: The CMDB business id, unique; NULL for a project not made from a business.
    bk_biz_id = BigIntegerField(null=True, unique=True)


class Task(BaseModel):
    id = BigIntegerField(primary_key=True)
    project = ForeignKeyField(Project, backref="tasks", on_delete="CASCADE")
    name = CharField(max_length=255)
    deleted = BooleanField(default=False)
    #: sha256 of the imported task record; an identical re-import is skipped. Every
    #: write to the task's rows changes it: caches of replies rely on that.
    digest = CharField(max_length=64)
    #: The engine's id of the task's root pipeline (bk-sops's `root_id:`); "" if not known.
    pipeline_id = CharField(max_length=64, default="")


class Node(BaseModel):
    id = BigAutoField()
    task = ForeignKeyField(Task, backref="nodes", on_delete="CASCADE")
    node_id = CharField(max_length=64)
    #: node_id of the enclosing sub-process node; "" at the root.
    parent_node_id = CharField(max_length=64, default="")
    #: Ancestor sub-process node ids, root first, as JSON text.
    path = TextField(default="[]")
    #: Order among the parent's children.
    position = IntegerField(default=0)
    name = CharField(max_length=255)
    kind = CharField(max_length=64)
    component_code = CharField(max_length=255, default="")
    component_version = CharField(max_length=64, default="")
    error_ignorable = BooleanField(default=False)
    #: Engine state name; NULL while the node has not run.
    state = CharField(max_length=32, null=True)
    loop = IntegerField(default=1)
    retry = IntegerField(default=0)
    skip = BooleanField(default=False)
    error_ignored = BooleanField(default=False)
    version = CharField(max_length=64, default="")
    started_at = BigIntegerField(null=True)
    finished_at = BigIntegerField(null=True)
    inputs = JsonTextField(default="{}")
    outputs = JsonTextField(default="{}")
    ex_data = JsonTextField(null=True)
    #: The tree gives the node no name (null, as bk-sops's events); ``name`` is then "".
    name_null = BooleanField(default=False)
    #: [[output key, key shown], ...] that root-level component_outputs constants rename
    #: (bk-sops's _format_outputs), as JSON text; NULL for none.
    renamed = JsonTextField(null=True)

    class Meta:
        indexes = (
            (("task", "node_id"), True),
            (("task", "parent_node_id", "position"), False),
        )


class Attempt(BaseModel):
    id = BigAutoField()
    task = ForeignKeyField(Task, backref="attempts", on_delete="CASCADE")
    node_id = CharField(max_length=64)
    loop = IntegerField()
    retry = IntegerField()
    skip = BooleanField()
    version = CharField(max_length=64)
    #: NULL reads as FAILED: an attempt that was retried had failed.
    state = CharField(max_length=32, null=True)
    started_at = BigIntegerField(null=True)
    finished_at = BigIntegerField(null=True)
    inputs = JsonTextField(default="{}")
    outputs = JsonTextField(default="{}")
    ex_data = JsonTextField(null=True)
    #: The engine's own id of this history (what bk-sops's log API takes); NULL: use id.
    history_id = BigIntegerField(null=True)

    class Meta:
        indexes = ((("task", "node_id", "loop"), False),)


class ComponentSchema(BaseModel):
    id = BigAutoField()
    code = CharField(max_length=255)
    version = CharField(max_length=64)
    #: JSON list of [key, name] pairs in declared order.
    outputs = JsonTextField()

    class Meta:
        indexes = ((("code", "version"), True),)


class SchemaVersion(BaseModel):
    id = IntegerField(primary_key=True)
    version = IntegerField()


class CatalogStamp(BaseModel):
    """A counter every write to projects or component schemas bumps.

    With a task's digest it stamps everything a reply is built from, so a cached
    reply can be checked for staleness with one indexed read.
    """

    id = IntegerField(primary_key=True)
    stamp = BigIntegerField()


class App(BaseModel):
    """A BlueKing app allowed to call: its secret only as a salted scrypt hash."""

    code = CharField(max_length=64, primary_key=True)
    secret_hash = CharField(max_length=255)
    #: True: every business, present and future; False: only its grants.
    all_businesses = BooleanField(default=False)
    #: Whether the app may name its user with bk_username instead of a bk_token.
    may_assert_user = BooleanField(default=False)
    revoked = BooleanField(default=False)
    #: Microseconds since the epoch of the last change (creation, rotation, revocation).
    updated_at = BigIntegerField()


class AppGrant(BaseModel):
    """One business an app may read."""

    id = BigAutoField()
    app = ForeignKeyField(App, backref="grants", on_delete="CASCADE", column_name="app_code")
    bk_biz_id = BigIntegerField()

    class Meta:
        indexes = ((("app", "bk_biz_id"), True),)


class UserToken(BaseModel):
    """A bk_token issued by the command line: its sha256 only, and when it expires."""

    token_hash = CharField(max_length=64, primary_key=True)
    username = CharField(max_length=64)
    expires_at = BigIntegerField()


MODELS: tuple[type[BaseModel], ...] = (
    Project,
    Task,
    Node,
    Attempt,
    ComponentSchema,
    SchemaVersion,
    App,
    AppGrant,
    UserToken,
    CatalogStamp,
)
