"""The benchmark's own records: a node with 3 earlier attempts, one with 1,000.

Both live in business 2 (the demo app's), beside whatever else the database holds.
"""

from __future__ import annotations

from typing import Any

TASK_ID = 900
NODE_3 = "node" + "be0c4" + "0" * 20 + "003"
NODE_1000 = "node" + "be0c4" + "0" * 19 + "1000"


def _payload(n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    inputs: dict[str, Any] = {
        "job_account": "root",
        "job_script_source": "manual",
        "job_script_type": "1",
        "job_script_timeout": 600,
        "job_ip_list": "127.0.0.1,127.0.0.2,127.0.0.3",
        "job_content": "#!/bin/bash\n" + "echo checking disk usage on every host; df -h\n" * 6,
        "job_script_param": f"--attempt {n} --verbose",
        "image": "registry.local/ops/runner@sha256:" + "0f" * 32,
        "notes": "Nightly maintenance of the build cluster. " * 8,
        "retries": 3,
        "ratio": 0.75,
        "dry_run": False,
    }
    outputs: dict[str, Any] = {
        "job_inst_id": 407584 + n,
        "job_inst_url": f"https://job.example/{407584 + n}",
        "_result": n % 2 == 0,
        "_loop": 1,
        "bytes_freed": 9007199254740993 + n,
        "summary": {"hosts": 3, "failed": n % 3, "load": [0.5, 0.25, 0.125]},
    }
    return inputs, outputs


def _attempts(count: int) -> list[dict[str, Any]]:
    rows = []
    for n in range(count):
        inputs, outputs = _payload(n)
        second = n % 50
        rows.append(
            {
                "loop": 1,
                "retry": n,
                "version": f"{n:032x}",
                "state": "FAILED",
                "start_time": f"2026-11-26T03:{n // 50 % 60:02d}:{second:02d}+08:00",
                "finish_time": f"2026-11-26T03:{n // 50 % 60:02d}:{second + 5:02d}+08:00",
                "inputs": inputs,
                "outputs": outputs,
                "ex_data": f"attempt {n} failed: exit code 1 on 127.0.0.2",
            }
        )
    return rows


def _node(node_id: str, attempts: int) -> dict[str, Any]:
    inputs, outputs = _payload(attempts)
    return {
        "id": node_id,
        "name": f"Clean disks ({attempts} earlier attempts)",
        "component": {"code": "job_fast_execute_script", "version": "legacy"},
        "inputs": inputs,
        "outputs": outputs,
        "execution": {
            "state": "FINISHED",
            "retry": attempts,
            "version": f"{attempts + 1:032x}",
            "start_time": "2026-11-26T04:00:00+08:00",
            "finish_time": "2026-11-26T04:00:07+08:00",
        },
        "attempts": _attempts(attempts),
    }


def document() -> dict[str, Any]:
    """The import document of the benchmark task."""
    return {
        "format": "tasknode-import/1",
        "tasks": [
            {
                "id": TASK_ID,
                "project_id": 1,
                "name": "Benchmark",
                "nodes": [_node(NODE_3, 3), _node(NODE_1000, 1000)],
            }
        ],
    }
