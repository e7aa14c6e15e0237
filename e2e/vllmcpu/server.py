"""Start and stop one real vLLM OpenAI server (CPU build) as a subprocess, for tests.

vLLM spawns an engine-core process (and a worker under it), so the server runs in its own session and is
stopped by signalling the whole process group: nothing is left behind when a test ends or fails.
Ports are free ports picked at run time; several people run tests on this machine at once, and vLLM itself
picks free ports for its engine cores' sockets while it starts, so a port free when it was picked can be taken
before vLLM binds it ("Address already in use"). A server whose ports it picked itself relaunches on fresh ones
when that is why start-up failed (``PORT_CLASH_RELAUNCHES`` times at most); any other start-up failure raises.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from e2e.support.ports import free_port, free_port_pair, port_clash

from .env import vllm_python

# Startup on 2 shared cores: 60-90 s for one server, more for two at once.
DEFAULT_START_TIMEOUT = 240.0
PORT_CLASH_RELAUNCHES = 2


@dataclass
class VllmServer:
    """A vLLM server on ``model_dir`` with prefix caching and KV events; optional ExampleConnector (P/D).

    Use as a context manager (``with VllmServer(...) as srv``) or call ``start()``/``stop()``.
    ``block_size=None`` keeps vLLM's own default (128 on the CPU backend).
    """

    model_dir: Path
    model_name: str = "tiny"
    block_size: int | None = None
    max_model_len: int = 2048
    max_num_seqs: int = 8
    kv_events: bool = True
    kv_events_topic: str = "kv-events"
    shared_storage_path: Path | None = None  # set: ExampleConnector kv_both on this folder
    kv_cache_space_gib: int = 1
    # usage.prompt_tokens_details.cached_tokens in responses (vLLM's default is off: the field is null).
    prompt_tokens_details: bool = True
    # Cap the KV cache at this many blocks (--num-gpu-blocks-override): small caches make kv_cache_usage_perc
    # move and let tests force evictions (BlockRemoved events). None: whatever VLLM_CPU_KVCACHE_SPACE gives.
    num_blocks: int | None = None
    # VLLM_SERVER_DEV_MODE=1 adds POST /reset_prefix_cache (-> AllBlocksCleared event), /sleep, /wake_up.
    dev_mode: bool = True
    extra_args: list[str] = field(default_factory=list)
    start_timeout: float = DEFAULT_START_TIMEOUT
    log_path: Path | None = None
    port: int = 0  # 0: a free port picked at launch
    # 0: picked at launch, with the next port free too (data-parallel rank r publishes on this port + r)
    kv_events_port: int = 0
    startup_seconds: float | None = None
    port_clash_relaunches: int = 0  # how often start-up hit a taken port and relaunched on fresh ones

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None
        self._picks_ports = self.port == 0 and self.kv_events_port == 0

    # -- addresses ---------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as an endpoint list or the ``x-gateway-destination-endpoint`` header names it."""
        return f"127.0.0.1:{self.port}"

    @property
    def kv_events_endpoint(self) -> str:
        """Where a subscriber connects (the server binds ``tcp://*:PORT``)."""
        return f"tcp://127.0.0.1:{self.kv_events_port}"

    # -- command line ------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        args = [
            str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--enable-prefix-caching",
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--enforce-eager",  # no graph capture / compile: the biggest start-up saving on CPU
            "--seed", "0",
        ]
        if self.prompt_tokens_details:
            args.append("--enable-prompt-tokens-details")
        if self.num_blocks is not None:
            args += ["--num-gpu-blocks-override", str(self.num_blocks)]
        if self.block_size is not None:
            args += ["--block-size", str(self.block_size)]
        if self.kv_events:
            args += ["--kv-events-config", json.dumps({
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": f"tcp://*:{self.kv_events_port}",
                "topic": self.kv_events_topic,
            })]
        if self.shared_storage_path is not None:
            args += ["--kv-transfer-config", json.dumps({
                "kv_connector": "ExampleConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"shared_storage_path": str(self.shared_storage_path)},
            })]
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_space_gib),
            "VLLM_LOGGING_LEVEL": env.get("VLLM_LOGGING_LEVEL", "INFO"),
            "PYTHONHASHSEED": "0",  # deterministic sha256 block-hash seed across pods
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        })
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env

    # -- life cycle --------------------------------------------------------------------------------------
    def launch(self) -> None:
        """Start the process without waiting (see ``wait_ready``), so two servers can start in parallel."""
        if self._proc is not None:
            raise RuntimeError("already started")
        self.port = self.port or free_port()
        if self.kv_events:
            self.kv_events_port = self.kv_events_port or free_port_pair()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"vllm-{self.model_name}-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_file = open(self.log_path, "wb")
        self._t0 = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(), stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.environment(), start_new_session=True,
        )

    def wait_ready(self) -> None:
        """Wait for GET /health = 200; on failure stop the server and raise with the log tail."""
        assert self._proc is not None, "launch() first"
        deadline = self._t0 + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                self.stop()
                if self._relaunch_after_port_clash():
                    deadline = self._t0 + self.start_timeout
                    continue
                raise RuntimeError(f"vLLM exited with {self._proc.returncode} during start-up\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"vLLM not healthy after {self.start_timeout:.0f} s on {self.base_url}\n{self.log_tail()}"
                )
            time.sleep(0.5)
        self.startup_seconds = time.monotonic() - self._t0

    def _relaunch_after_port_clash(self) -> bool:
        """Relaunch on fresh ports if the last start-up died on a taken port we picked; False: it did not."""
        if not self._picks_ports or self.port_clash_relaunches >= PORT_CLASH_RELAUNCHES:
            return False
        assert self.log_path is not None
        if not port_clash(self.log_path.read_text(errors="replace")):
            return False
        self.port_clash_relaunches += 1
        self._proc = None
        self.port = self.kv_events_port = 0
        self.launch()  # the same log file, rewritten
        return True

    def start(self) -> VllmServer:
        self.launch()
        self.wait_ready()
        return self

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
        proc = self._proc
        if proc is None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            # The engine core may outlive the API server for a moment: kill whatever remains in the group.
            _signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- small helpers for tests -------------------------------------------------------------------------
    def metrics_text(self, timeout: float = 10.0) -> str:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=timeout) as r:
            return r.read().decode()

    def cache_config(self) -> dict[str, str]:
        """The labels of ``vllm:cache_config_info`` (block_size, num_gpu_blocks, ...)."""
        from prometheus_client.parser import text_string_to_metric_families

        for fam in text_string_to_metric_families(self.metrics_text()):
            if fam.name == "vllm:cache_config_info":
                return dict(fam.samples[0].labels)
        raise LookupError("vllm:cache_config_info not in /metrics")

    def actual_block_size(self) -> int:
        return int(self.cache_config()["block_size"])


def start_all(servers: list[VllmServer]) -> list[VllmServer]:
    """Start several servers in parallel; if one fails, stop them all and raise."""
    try:
        for s in servers:
            s.launch()
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
