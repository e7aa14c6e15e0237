"""`kvswitch serve` with a bad configuration: one line naming the key, exit status 2, nothing started."""

from __future__ import annotations

import pytest

from extproc.serve import main


@pytest.mark.parametrize("config, flags, names", [
    ("scheduler:\n  colour: blue\n", [], "scheduler.colour: unknown key"),
    ("scheduler:\n  scorers: [{type: queue, weight: heavy}]\n", [], "scheduler.scorers[0].weight: expected a number"),
    ("scheduler:\n  profile: fastest\n", [], "scheduler.profile: unknown profile 'fastest'"),
    ("server:\n  grpc_port: 70000\n", [], "server.grpc_port: 70000 is not a port number"),
    ("endpoints:\n  - {address: 10.0.0.1:8000, accelerator: TPU}\n", [], "endpoints[0]: unknown accelerator 'TPU'"),
    (None, ["--endpoint", "10.0.0.1"], "--endpoint '10.0.0.1'"),
    (None, ["--endpoint", "10.0.0.1:8000,role=leader"], "--endpoint '10.0.0.1:8000,role=leader'"),
    (None, ["--endpoint", "10.0.0.1:8000,colour"], "option 'colour' must be key=value"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, config, flags, names):
    args = ["--port", "0", "--metrics-port", "-1", *flags]
    if config is not None:
        path = tmp_path / "picker.yaml"
        path.write_text(config)
        args += ["--config", str(path)]
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvswitch serve: "), err
    assert names in lines[0], lines[0]
    assert "Traceback" not in err and out == ""


def test_a_started_picker_hides_its_start_up_objects_from_the_collector():
    """`kvswitch serve`'s run loop freezes what exists once the picker is up (gc.freeze): a full collection then
    scans only what was made since (one took 59 ms in a serving picker before). In a child process: freezing
    this test process would keep its garbage forever."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import asyncio, gc, os, signal
        from extproc.config import config_from_dict
        from extproc.serve import _run
        from extproc.server import build_scheduler, build_server

        cfg = config_from_dict({"server": {"host": "127.0.0.1", "grpc_port": 0, "metrics_port": -1,
                                           "decide_port": 0}, "endpoints": [{"address": "127.0.0.1:9"}]})
        server = build_server(cfg, build_scheduler(cfg))
        seen = []

        async def main():
            async def watch():
                while server.port == 0 or not gc.get_freeze_count():
                    await asyncio.sleep(0.01)
                seen.append(gc.get_freeze_count())
                os.kill(os.getpid(), signal.SIGTERM)
            asyncio.get_running_loop().create_task(watch())
            await asyncio.wait_for(_run(server), 30)

        asyncio.run(main())
        print(seen[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) > 10_000  # the modules, the scheduler's tables, numba...
