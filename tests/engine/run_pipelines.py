"""Runs real pipelines with the real bamboo-engine into a database, as bk-sops would leave it.

This file runs only inside the engine's own virtualenv (tests/engine/requirements.txt, built by
tests/engine/harness.py); the service never imports it. Given a database URL of the kinds the
suite's `database_url` fixture makes, it configures Django in code, migrates the engine's apps,
creates bk-sops's own `core_project` and `taskflow3_taskflowinstance` tables with plain DDL,
runs the pipelines below synchronously (Celery in eager mode: no broker, no worker), links each
to a task of a project, and writes a JSON manifest of what ran and what each node must show.

    python run_pipelines.py DATABASE_URL MANIFEST_PATH [--loop-passes N] [--poll-passes N
        [--poll-pause SECONDS]] [--only-loop]
    python run_pipelines.py DATABASE_URL MANIFEST_PATH --schema-only

The engine prints to stdout while it works, so the manifest goes to a file. With --loop-passes,
a last pipeline `long_loop` loops N times; with --poll-passes, then `long_poll` polls N times
(a node RUNNING whose outputs the engine rewrites at each schedule). The manifest is written
before each starts (its `running` true) and again when it ends, so a reader can watch the
engine write.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import decimal
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import unquote
from urllib.parse import urlsplit

#: The business whose project (synced from CMDB) holds the tasks, and another one's.
BUSINESS_ID = 2
OTHER_BUSINESS_ID = 3

#: A value JSON cannot carry, so the engine pickles the node's outputs.
WHEN = datetime.datetime(2024, 5, 17, 8, 30, 15, tzinfo=datetime.UTC)


def nid() -> str:
    """A node or pipeline id as bk-sops makes them: "node" + 28 hex digits (32 characters)."""
    return "node" + uuid.uuid4().hex[:28]


def django_database(url: str) -> dict[str, Any]:
    """Django's DATABASES entry for a sqlite:///, postgresql:// or mysql:// URL."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # As the service reads it: sqlite:///var/x.db is relative, sqlite:////tmp/x.db absolute.
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": unquote(parts.path[1:])}
    common = {
        "NAME": parts.path.lstrip("/"),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or ""),
    }
    if parts.scheme in ("postgresql", "postgres"):
        options = {}
        for value in parse_qs(parts.query).get("options", []):
            options["options"] = value
        return {"ENGINE": "django.db.backends.postgresql", "OPTIONS": options, **common}
    if parts.scheme in ("mysql", "mariadb"):
        import pymysql

        pymysql.install_as_MySQLdb()
        return {"ENGINE": "django.db.backends.mysql", "OPTIONS": {"charset": "utf8mb4"}, **common}
    raise ValueError(f"unsupported database URL scheme {parts.scheme!r}")


def configure(url: str) -> None:
    """Django and Celery settings in code: the engine's apps, eager tasks, bk-sops's zone."""
    from celery import Celery
    from django.conf import settings

    app = Celery("engine-harness", broker="memory://")
    app.conf.update(
        task_always_eager=True,
        task_eager_propagates=True,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
    )
    app.set_current()
    app.set_default()

    settings.configure(
        DEBUG=False,
        SECRET_KEY="engine-harness",
        USE_TZ=True,
        TIME_ZONE="Asia/Shanghai",
        DATABASES={"default": django_database(url)},
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django_celery_beat",
            "pipeline",
            "pipeline.log",
            "pipeline.engine",
            "pipeline.component_framework",
            "pipeline.variable_framework",
            "pipeline.django_signal_valve",
            "pipeline.eri",
        ],
        LOGGING_CONFIG=None,
    )
    import django

    django.setup()
    import pipeline.eri.celery.tasks  # noqa: F401  (registers execute/schedule on the app)


def migrate() -> None:
    """The engine's tables. A SQLite file is put in WAL mode first, so that readers and the
    engine do not block each other (in rollback-journal mode a busy reader starves its commits)."""
    from django.core.management import call_command
    from django.db import connection

    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=wal")
    call_command("migrate", verbosity=0, interactive=False)


def create_bksops_tables() -> None:
    """bk-sops's two tables, columns as its models (gcloud/core, gcloud/taskflow3) define them."""
    from django.db import connection

    vendor = connection.vendor
    auto = {
        "sqlite": "integer NOT NULL PRIMARY KEY AUTOINCREMENT",
        "postgresql": "serial NOT NULL PRIMARY KEY",
        "mysql": "integer NOT NULL PRIMARY KEY AUTO_INCREMENT",
    }[vendor]
    boolean = "bool" if vendor == "mysql" else "boolean"
    moment = (
        "datetime(6)"
        if vendor == "mysql"
        else ("timestamp with time zone" if vendor == "postgresql" else "datetime")
    )
    text = "longtext" if vendor == "mysql" else "text"
    statements = [
        f"""CREATE TABLE core_project (
            id {auto},
            name varchar(192) NOT NULL,
            time_zone varchar(100) NOT NULL,
            creator varchar(256) NOT NULL,
            "desc" varchar(512) NOT NULL,
            create_at {moment} NOT NULL,
            from_cmdb {boolean} NOT NULL,
            bk_biz_id integer NOT NULL,
            is_disable {boolean} NOT NULL,
            tenant_id varchar(64) NOT NULL,
            UNIQUE (bk_biz_id, name))""",
        "CREATE INDEX core_project_tenant_id ON core_project (tenant_id)",
        f"""CREATE TABLE taskflow3_taskflowinstance (
            id {auto},
            project_id integer NULL REFERENCES core_project (id),
            pipeline_instance_id integer NULL REFERENCES pipeline_pipelineinstance (id),
            category varchar(255) NOT NULL,
            template_id varchar(255) NOT NULL,
            template_source varchar(32) NOT NULL,
            create_method varchar(30) NOT NULL,
            create_info varchar(255) NOT NULL,
            flow_type varchar(255) NOT NULL,
            current_flow varchar(255) NOT NULL,
            is_deleted {boolean} NOT NULL,
            engine_ver integer NOT NULL,
            recorded_executor_proxy varchar(255) NULL,
            is_child_taskflow {boolean} NOT NULL,
            extra_info {text} NULL)""",
        "CREATE INDEX taskflow3_taskflowinstance_project_id"
        " ON taskflow3_taskflowinstance (project_id)",
        "CREATE INDEX taskflow3_taskflowinstance_pipeline_instance_id"
        " ON taskflow3_taskflowinstance (pipeline_instance_id)",
    ]
    with connection.cursor() as cursor:
        for statement in statements:
            if vendor == "mysql":
                statement = statement.replace('"desc"', "`desc`")
            cursor.execute(statement)


def define_components() -> list[dict[str, Any]]:
    """The plugins the pipelines use; defining a Component class registers it (and writes its
    component_framework_componentmodel row). Returns their output schemas as the import format
    (docs/import-format.md) writes components: what each plugin's outputs_format() declares."""
    from pipeline.component_framework.component import Component
    from pipeline.core.flow.activity import Service
    from pipeline.core.flow.activity import StaticIntervalGenerator
    from pipeline.core.flow.io import StringItemSchema

    class EchoService(Service):
        """Succeeds, echoing its inputs as outputs (plus a fixed `greeting`)."""

        def execute(self, data: Any, parent_data: Any) -> bool:
            for key, value in data.inputs.items():
                if not key.startswith("_"):
                    data.set_outputs(key, value)
            data.set_outputs("greeting", "你好, 世界")
            return True

        def outputs_format(self) -> list[Any]:
            return [
                self.OutputItem(
                    name="Greeting",
                    key="greeting",
                    type="string",
                    schema=StringItemSchema(description=""),
                )
            ]

    class GateService(Service):
        """Fails unless its input `ok` is true: failing, retried and skipped nodes."""

        def execute(self, data: Any, parent_data: Any) -> bool:
            if data.get_one_of_inputs("ok"):
                data.set_outputs("passed", True)
                return True
            data.set_outputs("ex_data", "gate closed: ok is false")
            return False

        def outputs_format(self) -> list[Any]:
            return []

    class ValuesService(Service):
        """Outputs values JSON cannot hold (the engine pickles them) or holds oddly."""

        def execute(self, data: Any, parent_data: Any) -> bool:
            kind = data.get_one_of_inputs("kind")
            if kind == "pickled":
                data.set_outputs("when", WHEN)
                data.set_outputs("day", WHEN.date())
                data.set_outputs("amount", decimal.Decimal("12.50"))
                data.set_outputs("ident", uuid.UUID("12345678-1234-5678-1234-567812345678"))
                if data.get_one_of_inputs("fail"):
                    data.set_outputs("ex_data", "failed after pickling")
                    return False
            else:
                data.set_outputs("nan", float("nan"))
                data.set_outputs("inf", float("inf"))
                data.set_outputs("huge", 2**70)
                data.set_outputs("text", "emoji \U0001f600 and 中文")
                data.set_outputs("big", "x" * 200_000)
            return True

        def outputs_format(self) -> list[Any]:
            return []

    class WaitService(Service):
        """Stays RUNNING until a callback arrives: a running node."""

        __need_schedule__ = True

        def execute(self, data: Any, parent_data: Any) -> bool:
            return True

        def schedule(self, data: Any, parent_data: Any, callback_data: Any = None) -> bool:
            self.finish_schedule()
            return True

        def outputs_format(self) -> list[Any]:
            return []

    class PollService(Service):
        """Polls: RUNNING through `polls` schedules (its input), each writing a new `polled`
        output (1, 2, ...) while its state and version stay, then finishes. Each schedule
        first waits `pause` seconds (its input), so a reader sees each one: Celery is eager
        here, so the next schedule runs at once, not after the interval."""

        __need_schedule__ = True
        interval = StaticIntervalGenerator(0)

        def execute(self, data: Any, parent_data: Any) -> bool:
            data.set_outputs("polled", 0)
            return True

        def schedule(self, data: Any, parent_data: Any, callback_data: Any = None) -> bool:
            time.sleep(float(data.get_one_of_inputs("pause")))
            polled = int(data.get_one_of_outputs("polled")) + 1
            data.set_outputs("polled", polled)
            if polled >= int(data.get_one_of_inputs("polls")):
                self.finish_schedule()
            return True

        def outputs_format(self) -> list[Any]:
            return []

    schemas = []
    for code, service in (
        ("harness_echo", EchoService),
        ("harness_gate", GateService),
        ("harness_values", ValuesService),
        ("harness_wait", WaitService),
        ("harness_poll", PollService),
    ):
        component: Any = type(
            f"{service.__name__}Component",
            (Component,),
            {
                "__module__": __name__,
                "name": code,
                "code": code,
                "bound_service": service,
            },
        )
        outputs = [{"key": item.key, "name": item.name} for item in service().outputs_format()]
        schemas.append({"code": code, "version": component.version, "outputs": outputs})
    return schemas


def web_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """The engine tree in the form bk-sops keeps in its execution snapshot (the web tree).

    bk-sops stores the web tree and converts it for the engine when a task starts
    (pipeline_web.parser.format.format_web_data_to_pipeline, not on PyPI). This goes the other
    way for the parts that conversion changes: the pipeline's `data` becomes `constants` (an
    input fed by a node's output is a `component_outputs` constant naming its source) and
    `outputs`; a service's `component.inputs` becomes `component.data` of `{hook, value}`, with
    the plugin `version`; sub-process pipelines likewise. Ids, flows, names and gateways stay.
    """
    web = copy.deepcopy(tree)
    data = web.pop("data", {}) or {}
    constants = {}
    for index, (key, var) in enumerate(data.get("inputs", {}).items()):
        constant = {
            "key": key,
            "name": key[2:-1],
            "index": index,
            "desc": "",
            "value": var.get("value"),
            "validation": "",
            "is_meta": False,
            "version": "legacy",
            "plugin_code": "",
        }
        if "source_act" in var:
            constant.update(
                source_type="component_outputs",
                source_info={var["source_act"]: [var["source_key"]]},
                custom_type="",
                source_tag="",
                show_type="hide",
                value="",
            )
        else:
            constant.update(
                source_type="custom",
                source_info={},
                custom_type="input",
                source_tag="input.input",
                show_type="show",
            )
        constants[key] = constant
    web["constants"] = constants
    web["outputs"] = list(data.get("outputs", []))
    for activity in web["activities"].values():
        if activity["type"] == "SubProcess":
            # The parent sets a shown constant of the sub-process by its value there.
            sub = web_tree(activity["pipeline"])
            for key, param in (activity.pop("params", None) or {}).items():
                sub["constants"][key]["value"] = param["value"]
            activity["pipeline"] = sub
            activity["constants"] = copy.deepcopy(sub["constants"])
            continue
        component = activity["component"]
        inputs = component.pop("inputs", {}) or {}
        component.pop("global_outputs", None)
        component["data"] = {
            key: {"hook": False, "value": var.get("value")} for key, var in inputs.items()
        }
        component["version"] = "legacy"
    return web


class Pipelines:
    """Builds, runs and records the pipelines; `manifest` is what the tests read."""

    def __init__(self) -> None:
        from pipeline.eri.runtime import BambooDjangoRuntime

        self.runtime = BambooDjangoRuntime()
        self.manifest: dict[str, Any] = {
            "business_id": BUSINESS_ID,
            "other_business_id": OTHER_BUSINESS_ID,
            "projects": {},
            "pipelines": {},
        }

    # -- building blocks -------------------------------------------------------------------

    def record(self, pipeline: str, label: str, node: Any, kind: str, **expect: Any) -> str:
        """Notes a node of a pipeline and what its engine rows must show."""
        self.manifest["pipelines"][pipeline]["nodes"][label] = {
            "id": node.id,
            "kind": kind,
            "expect": expect,
        }
        return str(node.id)

    def start(
        self,
        name: str,
        tree: dict[str, Any],
        *,
        run: bool = True,
        business_id: int = BUSINESS_ID,
        deleted: bool = False,
        engine_ver: int = 2,
    ) -> str:
        """Stores the tree, in bk-sops's web form, as the execution snapshot of a pipeline
        instance, links a task of business_id's project to it, and runs it unless not run.

        Like bk-sops's start_v2, the tree info (node_id_set) is computed when a task starts.
        """
        from bamboo_engine import api
        from django.utils import timezone
        from pipeline.models import PipelineInstance
        from pipeline.models import Snapshot

        snapshot = Snapshot.objects.create_snapshot(web_tree(tree))
        instance = PipelineInstance.objects.create(
            instance_id=tree["id"],
            name=name,
            creator="admin",
            executor="admin" if run else "",
            execution_snapshot=snapshot,
            is_started=run,
            start_time=timezone.now() if run else None,
        )
        if run:
            instance.calculate_tree_info(save=True)
        project_id = self.manifest["projects"][str(business_id)]
        task_id = self.add_task(instance.id, project_id, deleted, engine_ver)
        self.manifest["pipelines"][name].update(
            pipeline_id=tree["id"],
            task_id=task_id,
            instance_pk=instance.id,
            business_id=business_id,
            project_id=project_id,
            deleted=deleted,
            engine_ver=engine_ver,
            started=run,
        )
        if run:
            result = api.run_pipeline(runtime=self.runtime, pipeline=tree, cycle_tolerate=True)
            self.check(result, name)
        return str(tree["id"])

    def finish(self, name: str) -> None:
        """Marks the instance finished when its root state is, as bk-sops's signal handler does."""
        from pipeline.eri.models import State
        from pipeline.models import PipelineInstance

        pipeline_id = self.manifest["pipelines"][name]["pipeline_id"]
        finished = State.objects.filter(node_id=pipeline_id, name="FINISHED").exists()
        if finished:
            PipelineInstance.objects.set_finished(pipeline_id)
        self.manifest["pipelines"][name]["finished"] = finished

    def add_task(self, instance_pk: int, project_id: int, deleted: bool, engine_ver: int) -> int:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO taskflow3_taskflowinstance (project_id, pipeline_instance_id,"
                " category,"
                " template_id, template_source, create_method, create_info, flow_type,"
                " current_flow, is_deleted, engine_ver, recorded_executor_proxy,"
                " is_child_taskflow, extra_info)"
                " VALUES (%s, %s, 'Default', '1', 'project', 'app', '', 'common', 'execute_task',"
                " %s, %s, NULL, %s, NULL)",
                [project_id, instance_pk, deleted, engine_ver, False],
            )
            cursor.execute(
                "SELECT max(id) FROM taskflow3_taskflowinstance WHERE pipeline_instance_id = %s",
                [instance_pk],
            )
            return int(cursor.fetchone()[0])

    def add_project(self, name: str, business_id: int) -> None:
        """A project synced from CMDB business business_id, as bk-sops maps businesses."""
        from django.db import connection
        from django.utils import timezone

        with connection.cursor() as cursor:
            cursor.execute(
                'INSERT INTO core_project (name, time_zone, creator, "desc", create_at, from_cmdb,'
                " bk_biz_id, is_disable, tenant_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                if connection.vendor != "mysql"
                else "INSERT INTO core_project (name, time_zone, creator, `desc`, create_at,"
                " from_cmdb, bk_biz_id, is_disable, tenant_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    name,
                    "Asia/Shanghai",
                    "admin",
                    "",
                    timezone.now(),
                    True,
                    business_id,
                    False,
                    "default",
                ],
            )
            cursor.execute("SELECT id FROM core_project WHERE name = %s", [name])
            self.manifest["projects"][str(business_id)] = int(cursor.fetchone()[0])

    def new(self, name: str) -> None:
        self.manifest["pipelines"][name] = {"nodes": {}}

    # -- the pipelines ---------------------------------------------------------------------

    def services(self) -> None:
        """Service activities in a row: succeeds, error ignored, retried with new inputs, skipped,
        pickled values, unusual JSON values."""
        from bamboo_engine import api
        from bamboo_engine.builder import Data
        from bamboo_engine.builder import EmptyEndEvent
        from bamboo_engine.builder import EmptyStartEvent
        from bamboo_engine.builder import NodeOutput
        from bamboo_engine.builder import ServiceActivity
        from bamboo_engine.builder import Var
        from bamboo_engine.builder import build_tree

        name = "services"
        self.new(name)
        start = EmptyStartEvent(id=nid())
        ok = ServiceActivity(id=nid(), component_code="harness_echo", name="echo")
        ok.component.inputs.word = Var(type=Var.PLAIN, value="hello")
        ok.component.inputs.unicode = Var(type=Var.PLAIN, value="中文 \U0001f600")
        ignored = ServiceActivity(
            id=nid(), component_code="harness_gate", name="ignored", error_ignorable=True
        )
        ignored.component.inputs.ok = Var(type=Var.PLAIN, value=False)
        retried = ServiceActivity(id=nid(), component_code="harness_gate", name="retried")
        retried.component.inputs.ok = Var(type=Var.PLAIN, value=False)
        skipped = ServiceActivity(id=nid(), component_code="harness_gate", name="skipped")
        skipped.component.inputs.ok = Var(type=Var.PLAIN, value=False)
        pickled = ServiceActivity(id=nid(), component_code="harness_values", name="pickled")
        pickled.component.inputs.kind = Var(type=Var.PLAIN, value="pickled")
        # An input referring to another node's pickled output renders to a datetime.
        stamped = ServiceActivity(id=nid(), component_code="harness_echo", name="stamped")
        stamped.component.inputs.at = Var(type=Var.SPLICE, value="${when}")
        # Fails with pickled outputs, so its history row is pickled too; then retried.
        repickled = ServiceActivity(id=nid(), component_code="harness_values", name="repickled")
        repickled.component.inputs.kind = Var(type=Var.PLAIN, value="pickled")
        repickled.component.inputs.fail = Var(type=Var.PLAIN, value=True)
        odd = ServiceActivity(id=nid(), component_code="harness_values", name="odd")
        odd.component.inputs.kind = Var(type=Var.PLAIN, value="odd")
        end = EmptyEndEvent(id=nid())
        chain = [ok, ignored, retried, skipped, pickled, stamped, repickled, odd, end]
        node = start
        for following in chain:
            node = node.extend(following)
        data = Data()
        data.inputs["${when}"] = NodeOutput(
            type=Var.PLAIN, source_act=pickled.id, source_key="when"
        )
        # A root constant fed by a plugin's own output key: bk-sops shows that output renamed.
        data.inputs["${greeting_text}"] = NodeOutput(
            type=Var.PLAIN, source_act=ok.id, source_key="greeting"
        )
        tree = build_tree(start, id=uuid.uuid4().hex, data=data)

        self.record(name, "start", start, "start_event", state="FINISHED", data=False)
        self.record(name, "ok", ok, "succeeded", state="FINISHED", outputs={"word": "hello"})
        self.record(
            name,
            "ignored",
            ignored,
            "error_ignored",
            state="FINISHED",
            error_ignored=True,
            ex_data="gate closed: ok is false",
        )
        self.record(
            name,
            "retried",
            retried,
            "retried_with_new_inputs",
            state="FINISHED",
            retry=1,
            histories=1,
            inputs={"ok": True},
        )
        self.record(
            name,
            "skipped",
            skipped,
            "skipped",
            state="FINISHED",
            skip=True,
            histories=1,
            ex_data="gate closed: ok is false",
        )
        self.record(
            name,
            "pickled",
            pickled,
            "pickled_outputs",
            state="FINISHED",
            outputs_serializer="pickle",
        )
        self.record(
            name,
            "repickled",
            repickled,
            "retried_with_pickled_history",
            state="FINISHED",
            retry=1,
            histories=1,
            outputs_serializer="pickle",
            history_serializers=[["json", "pickle"]],
        )
        self.record(
            name,
            "stamped",
            stamped,
            "pickled_inputs",
            state="FINISHED",
            inputs_serializer="pickle",
            outputs_serializer="pickle",
        )
        self.record(
            name,
            "odd",
            odd,
            "non_finite_huge_unicode_outputs",
            state="FINISHED",
            outputs_serializer="json",
        )
        self.record(name, "end", end, "end_event", state="FINISHED", data=False)

        self.start(name, tree)
        # New inputs must be JSON: eri_data keeps no pickles.
        self.check(api.retry_node(self.runtime, retried.id, data={"ok": True}), "retry")
        self.check(api.skip_node(self.runtime, skipped.id), "skip")
        new_inputs = {"kind": "pickled", "fail": False}
        self.check(api.retry_node(self.runtime, repickled.id, data=new_inputs), "retry")
        self.finish(name)

    def loop(self) -> None:
        """A node re-run three times through an exclusive gateway's back edge."""
        from bamboo_engine import api
        from bamboo_engine.builder import Data
        from bamboo_engine.builder import EmptyEndEvent
        from bamboo_engine.builder import EmptyStartEvent
        from bamboo_engine.builder import ExclusiveGateway
        from bamboo_engine.builder import NodeOutput
        from bamboo_engine.builder import ServiceActivity
        from bamboo_engine.builder import Var
        from bamboo_engine.builder import build_tree

        name = "loop"
        self.new(name)
        start = EmptyStartEvent(id=nid())
        body = ServiceActivity(id=nid(), component_code="harness_echo", name="body")
        body.component.inputs.word = Var(type=Var.PLAIN, value="again")
        # Fails on the first pass; retried with new inputs, which every later pass keeps.
        flaky = ServiceActivity(id=nid(), component_code="harness_gate", name="flaky")
        flaky.component.inputs.ok = Var(type=Var.PLAIN, value=False)
        decide = ExclusiveGateway(
            id=nid(), conditions={0: "${count} < 3", 1: "${count} >= 3"}, name="decide"
        )
        end = EmptyEndEvent(id=nid())
        start.extend(body).extend(flaky).extend(decide).connect(body, end)
        data = Data()
        data.inputs["${count}"] = NodeOutput(type=Var.PLAIN, source_act=body.id, source_key="_loop")
        tree = build_tree(start, id=uuid.uuid4().hex, data=data)

        self.record(name, "start", start, "start_event", state="FINISHED", data=False)
        self.record(
            name,
            "body",
            body,
            "looped_activity",
            state="FINISHED",
            loop=3,
            histories=2,
            history_passes=[[1, 0], [2, 0]],
        )
        self.record(
            name,
            "flaky",
            flaky,
            "retried_in_a_loop",
            state="FINISHED",
            loop=3,
            histories=3,
            history_passes=[[1, 0], [1, 1], [2, 0]],
            inputs={"ok": True},
        )
        self.record(
            name,
            "decide",
            decide,
            "exclusive_gateway_back_edge",
            state="FINISHED",
            loop=3,
            histories=2,
            history_passes=[[1, 0], [2, 0]],
            data=False,
        )
        self.record(name, "end", end, "end_event", state="FINISHED", data=False)
        self.start(name, tree)
        self.check(api.retry_node(self.runtime, flaky.id, data={"ok": True}), "retry in loop")
        self.finish(name)

    def nested(self) -> None:
        """Sub-processes two levels deep beside a branch that is never taken."""
        from bamboo_engine.builder import ConvergeGateway
        from bamboo_engine.builder import Data
        from bamboo_engine.builder import DataInput
        from bamboo_engine.builder import EmptyEndEvent
        from bamboo_engine.builder import EmptyStartEvent
        from bamboo_engine.builder import ExclusiveGateway
        from bamboo_engine.builder import ParallelGateway
        from bamboo_engine.builder import Params
        from bamboo_engine.builder import ServiceActivity
        from bamboo_engine.builder import SubProcess
        from bamboo_engine.builder import Var
        from bamboo_engine.builder import build_tree

        name = "nested"
        self.new(name)
        deep_start = EmptyStartEvent(id=nid())
        deep_act = ServiceActivity(id=nid(), component_code="harness_echo", name="deep")
        deep_act.component.inputs.word = Var(type=Var.PLAIN, value="level 2")
        deep_end = EmptyEndEvent(id=nid())
        deep_start.extend(deep_act).extend(deep_end)
        inner = SubProcess(id=nid(), start=deep_start, name="inner")

        # The outer sub-process takes ${word} from the root's ${root_word}.
        outer_start = EmptyStartEvent(id=nid())
        outer_act = ServiceActivity(id=nid(), component_code="harness_echo", name="shallow")
        outer_act.component.inputs.word = Var(type=Var.SPLICE, value="${word}")
        outer_end = EmptyEndEvent(id=nid())
        outer_start.extend(outer_act).extend(inner).extend(outer_end)
        outer = SubProcess(
            id=nid(),
            start=outer_start,
            name="outer",
            data=Data(inputs={"${word}": DataInput(type=Var.PLAIN, value="default")}),
            params=Params({"${word}": Var(type=Var.SPLICE, value="${root_word}")}),
        )

        start = EmptyStartEvent(id=nid())
        fork = ParallelGateway(id=nid(), name="fork")
        side = ServiceActivity(id=nid(), component_code="harness_echo", name="side")
        side.component.inputs.word = Var(type=Var.PLAIN, value="beside")
        choose = ExclusiveGateway(id=nid(), conditions={0: "1 == 1", 1: "1 == 0"}, name="choose")
        taken = ServiceActivity(id=nid(), component_code="harness_echo", name="taken")
        taken.component.inputs.word = Var(type=Var.PLAIN, value="taken")
        not_run = ServiceActivity(id=nid(), component_code="harness_echo", name="not run")
        not_run.component.inputs.word = Var(type=Var.PLAIN, value="never")
        choose_merge = ConvergeGateway(id=nid(), name="choose merge")
        join = ConvergeGateway(id=nid(), name="join")
        end = EmptyEndEvent(id=nid())
        start.extend(fork).connect(outer, side)
        outer.extend(join)
        side.extend(choose).connect(taken, not_run)
        taken.extend(choose_merge)
        not_run.extend(choose_merge)
        choose_merge.extend(join)
        join.extend(end)
        data = Data(inputs={"${root_word}": Var(type=Var.PLAIN, value="from the root")})
        tree = build_tree(start, id=uuid.uuid4().hex, data=data)

        self.record(name, "fork", fork, "parallel_gateway", state="FINISHED", data=False)
        self.record(
            name,
            "outer",
            outer,
            "subprocess_level_1",
            state="FINISHED",
            parent=tree["id"],
            children=4,
            inputs={"${word}": "from the root"},
        )
        self.record(
            name,
            "shallow",
            outer_act,
            "activity_in_subprocess",
            state="FINISHED",
            parent=outer.id,
            outputs={"word": "from the root"},
        )
        self.record(
            name,
            "inner",
            inner,
            "subprocess_level_2",
            state="FINISHED",
            parent=outer.id,
            children=3,
        )
        self.record(
            name,
            "deep",
            deep_act,
            "activity_in_subprocess_level_2",
            state="FINISHED",
            parent=inner.id,
            outputs={"word": "level 2"},
        )
        self.record(name, "choose", choose, "exclusive_gateway", state="FINISHED", data=False)
        self.record(name, "taken", taken, "succeeded", state="FINISHED")
        self.record(name, "not_run", not_run, "not_run", state=None)
        self.record(name, "join", join, "converge_gateway", state="FINISHED", data=False)
        self.start(name, tree)
        self.finish(name)

    def stuck(self) -> None:
        """A node still RUNNING (waits for a callback), its successor not run, and a sub-process
        whose child failed."""
        from bamboo_engine.builder import ConvergeGateway
        from bamboo_engine.builder import Data
        from bamboo_engine.builder import DataInput
        from bamboo_engine.builder import EmptyEndEvent
        from bamboo_engine.builder import EmptyStartEvent
        from bamboo_engine.builder import ParallelGateway
        from bamboo_engine.builder import Params
        from bamboo_engine.builder import ServiceActivity
        from bamboo_engine.builder import SubProcess
        from bamboo_engine.builder import Var
        from bamboo_engine.builder import build_tree

        name = "stuck"
        self.new(name)
        sub_start = EmptyStartEvent(id=nid())
        failing = ServiceActivity(id=nid(), component_code="harness_gate", name="fails")
        failing.component.inputs.ok = Var(type=Var.PLAIN, value=False)
        sub_end = EmptyEndEvent(id=nid())
        sub_start.extend(failing).extend(sub_end)
        sub = SubProcess(id=nid(), start=sub_start, name="with failed child")

        start = EmptyStartEvent(id=nid())
        fork = ParallelGateway(id=nid())
        wait = ServiceActivity(id=nid(), component_code="harness_wait", name="waits")
        after = ServiceActivity(id=nid(), component_code="harness_echo", name="after")
        after.component.inputs.word = Var(type=Var.PLAIN, value="later")
        later_start = EmptyStartEvent(id=nid())
        later_act = ServiceActivity(id=nid(), component_code="harness_echo", name="later child")
        later_act.component.inputs.word = Var(type=Var.SPLICE, value="${word}")
        later_end = EmptyEndEvent(id=nid())
        later_start.extend(later_act).extend(later_end)
        later = SubProcess(
            id=nid(),
            start=later_start,
            name="later",
            data=Data(inputs={"${word}": DataInput(type=Var.PLAIN, value="sub default")}),
            params=Params({"${word}": Var(type=Var.PLAIN, value="set by parent")}),
        )
        join = ConvergeGateway(id=nid())
        end = EmptyEndEvent(id=nid())
        start.extend(fork).connect(wait, sub)
        wait.extend(after).extend(later).extend(join)
        sub.extend(join)
        join.extend(end)
        tree = build_tree(start, id=uuid.uuid4().hex)

        self.record(name, "wait", wait, "running", state="RUNNING")
        self.record(name, "after", after, "not_run_after_running", state=None)
        self.record(name, "later", later, "subprocess_not_run", state=None)
        self.record(
            name, "later_child", later_act, "not_run_in_subprocess", state=None, parent=later.id
        )
        self.record(
            name,
            "sub",
            sub,
            "subprocess_with_failed_child",
            state="RUNNING",
            parent=tree["id"],
            children=2,
        )
        self.record(
            name,
            "fails",
            failing,
            "failed",
            state="FAILED",
            parent=sub.id,
            ex_data="gate closed: ok is false",
        )
        self.record(name, "end", end, "end_not_run", state=None)
        self.start(name, tree)
        self.finish(name)

    def called_back(self) -> None:
        """A node that waits for a callback, then gets it and finishes."""
        from bamboo_engine import api
        from bamboo_engine.builder import EmptyEndEvent
        from bamboo_engine.builder import EmptyStartEvent
        from bamboo_engine.builder import ServiceActivity
        from bamboo_engine.builder import build_tree
        from pipeline.eri.models import State

        name = "called_back"
        self.new(name)
        start = EmptyStartEvent(id=nid())
        wait = ServiceActivity(id=nid(), component_code="harness_wait", name="answered")
        end = EmptyEndEvent(id=nid())
        start.extend(wait).extend(end)
        tree = build_tree(start, id=uuid.uuid4().hex)
        self.record(name, "wait", wait, "finished_by_callback", state="FINISHED")
        self.record(name, "end", end, "end_event", state="FINISHED", data=False)
        self.start(name, tree)
        version = State.objects.get(node_id=wait.id).version
        self.check(api.callback(self.runtime, wait.id, version, {"answer": 42}), "callback")
        self.finish(name)

    def paused(self) -> None:
        """A node paused before the engine reached it (pause_node_appoint), then reached; then
        the whole pipeline paused (pause_pipeline)."""
        from bamboo_engine import api
        from bamboo_engine.builder import EmptyEndEvent
        from bamboo_engine.builder import EmptyStartEvent
        from bamboo_engine.builder import ServiceActivity
        from bamboo_engine.builder import Var
        from bamboo_engine.builder import build_tree
        from pipeline.eri.models import State

        name = "paused"
        self.new(name)
        start = EmptyStartEvent(id=nid())
        wait = ServiceActivity(id=nid(), component_code="harness_wait", name="answered")
        held = ServiceActivity(id=nid(), component_code="harness_echo", name="held")
        held.component.inputs.word = Var(type=Var.PLAIN, value="held")
        end = EmptyEndEvent(id=nid())
        start.extend(wait).extend(held).extend(end)
        tree = build_tree(start, id=uuid.uuid4().hex)
        self.record(name, "wait", wait, "finished_by_callback", state="FINISHED")
        self.record(
            name,
            "held",
            held,
            "suspended_before_running",
            state="SUSPENDED",
            data=False,
            started=False,
        )
        self.record(name, "end", end, "not_run_after_suspended", state=None)
        self.start(name, tree)
        self.check(api.pause_node_appoint(self.runtime, held.id), "pause node")
        version = State.objects.get(node_id=wait.id).version
        self.check(api.callback(self.runtime, wait.id, version, {}), "callback")
        self.check(api.pause_pipeline(self.runtime, tree["id"]), "pause pipeline")
        self.finish(name)
        self.manifest["pipelines"][name]["root_state"] = "SUSPENDED"

    def small(self, name: str, *, run: bool, **task: Any) -> None:
        """start -> one service -> end, for tasks that differ in their task row."""
        from bamboo_engine.builder import EmptyEndEvent
        from bamboo_engine.builder import EmptyStartEvent
        from bamboo_engine.builder import ServiceActivity
        from bamboo_engine.builder import Var
        from bamboo_engine.builder import build_tree

        self.new(name)
        start = EmptyStartEvent(id=nid())
        act = ServiceActivity(id=nid(), component_code="harness_echo", name=name)
        act.component.inputs.word = Var(type=Var.PLAIN, value=name)
        end = EmptyEndEvent(id=nid())
        start.extend(act).extend(end)
        tree = build_tree(start, id=uuid.uuid4().hex)
        state = "FINISHED" if run else None
        self.record(name, "start", start, "start_event", state=state, data=False)
        self.record(name, "act", act, "succeeded" if run else "not_run", state=state)
        self.record(name, "end", end, "end_event", state=state, data=False)
        self.start(name, tree, run=run, **task)
        if run:
            self.finish(name)
        else:
            self.manifest["pipelines"][name]["finished"] = False

    def long_loop(self, passes: int, out: Path) -> None:
        """A loop of many passes, announced in the manifest before it runs."""
        from bamboo_engine.builder import Data
        from bamboo_engine.builder import EmptyEndEvent
        from bamboo_engine.builder import EmptyStartEvent
        from bamboo_engine.builder import ExclusiveGateway
        from bamboo_engine.builder import NodeOutput
        from bamboo_engine.builder import ServiceActivity
        from bamboo_engine.builder import Var
        from bamboo_engine.builder import build_tree

        name = "long_loop"
        self.new(name)
        start = EmptyStartEvent(id=nid())
        body = ServiceActivity(id=nid(), component_code="harness_echo", name="body")
        body.component.inputs.word = Var(type=Var.PLAIN, value="round")
        decide = ExclusiveGateway(
            id=nid(),
            conditions={0: f"${{count}} < {passes}", 1: f"${{count}} >= {passes}"},
            name="decide",
        )
        end = EmptyEndEvent(id=nid())
        start.extend(body).extend(decide).connect(body, end)
        data = Data()
        data.inputs["${count}"] = NodeOutput(type=Var.PLAIN, source_act=body.id, source_key="_loop")
        tree = build_tree(start, id=uuid.uuid4().hex, data=data)
        self.record(name, "body", body, "long_loop_body", state="FINISHED", loop=passes)
        self.record(name, "decide", decide, "long_loop_gateway", state="FINISHED", loop=passes)
        self.manifest["pipelines"][name]["running"] = True
        self.manifest["pipelines"][name]["passes"] = passes
        self.write(out)
        self.start(name, tree)
        self.finish(name)
        self.manifest["pipelines"][name]["running"] = False

    def long_poll(self, polls: int, pause: float, out: Path) -> None:
        """A polling node (harness_poll) that stays RUNNING through polls schedules, each
        writing new outputs in place, announced in the manifest before it runs."""
        from bamboo_engine.builder import EmptyEndEvent
        from bamboo_engine.builder import EmptyStartEvent
        from bamboo_engine.builder import ServiceActivity
        from bamboo_engine.builder import Var
        from bamboo_engine.builder import build_tree

        name = "long_poll"
        self.new(name)
        start = EmptyStartEvent(id=nid())
        poll = ServiceActivity(id=nid(), component_code="harness_poll", name="polls")
        poll.component.inputs.polls = Var(type=Var.PLAIN, value=polls)
        poll.component.inputs.pause = Var(type=Var.PLAIN, value=pause)
        end = EmptyEndEvent(id=nid())
        start.extend(poll).extend(end)
        tree = build_tree(start, id=uuid.uuid4().hex)
        self.record(name, "poll", poll, "polled", state="FINISHED", outputs={"polled": polls})
        self.record(name, "end", end, "end_event", state="FINISHED", data=False)
        self.manifest["pipelines"][name]["running"] = True
        self.manifest["pipelines"][name]["polls"] = polls
        self.write(out)
        self.start(name, tree)
        self.finish(name)
        self.manifest["pipelines"][name]["running"] = False

    def write(self, out: Path) -> None:
        """The manifest, replaced whole (a reader never sees half of it)."""
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps(self.manifest, indent=2, sort_keys=True))
        os.replace(partial, out)

    @staticmethod
    def check(result: Any, what: str) -> None:
        if not result.result:
            raise RuntimeError(f"{what}: {result.message}\n{result.exc_trace}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--loop-passes", type=int, default=0)
    parser.add_argument("--poll-passes", type=int, default=0)
    parser.add_argument("--poll-pause", type=float, default=0.2)
    parser.add_argument("--only-loop", action="store_true", help="skip the other pipelines")
    parser.add_argument(
        "--schema-only", action="store_true", help="create the tables only (server.db.bksops_scale)"
    )
    arguments = parser.parse_args(argv[1:])
    url, out = arguments.url, arguments.manifest
    configure(url)
    migrate()
    create_bksops_tables()
    if arguments.schema_only:
        out.write_text("{}")
        return 0
    components = define_components()
    pipelines = Pipelines()
    pipelines.manifest["components"] = components
    pipelines.add_project("engine-harness", BUSINESS_ID)
    pipelines.add_project("engine-harness-other", OTHER_BUSINESS_ID)
    if not arguments.only_loop:
        pipelines.services()
        pipelines.loop()
        pipelines.nested()
        pipelines.stuck()
        pipelines.called_back()
        pipelines.paused()
        pipelines.small("unstarted", run=False)
        pipelines.small("deleted", run=True, deleted=True)
        pipelines.small("other_business", run=True, business_id=OTHER_BUSINESS_ID)
        # Records of the legacy engine live in engine_* tables; this task has none anywhere.
        pipelines.small("legacy_engine", run=False, engine_ver=1)
    if arguments.loop_passes:
        pipelines.long_loop(arguments.loop_passes, out)
    if arguments.poll_passes:
        pipelines.long_poll(arguments.poll_passes, arguments.poll_pause, out)
    pipelines.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
