"""What `serve --demo` prints to try it: the demo's node on the service's own database, and
placeholders on a bk-sops database, whose tasks are not the demo's."""

from __future__ import annotations

from server.cli import DEMO_NODE
from server.cli import example_node
from server.config import Config


def test_the_example_asks_for_the_demo_node_on_the_own_database() -> None:
    assert example_node(Config(database_url="sqlite:///var/tasknode.db")) == DEMO_NODE


def test_the_example_names_no_demo_node_on_a_bksops_database() -> None:
    config = Config(
        database_url="sqlite:///var/tasknode.db",
        bksops_database_url="mysql://reader@bksops-db:3306/bk_sops",
    )
    example = example_node(config)
    assert example == {"bk_biz_id": "2", "task_id": "TASK_ID", "node_id": "NODE_ID"}
    assert DEMO_NODE["node_id"] not in example.values()
