"""The tokenizer the client (aiperf) and the simulated fleet share, made at run time (no downloads).

aiperf builds each prompt from the trace's hash ids with a tokenizer loaded from a local folder, and the
simulated pods count and hash tokens with the same tokenizer, so prompt lengths and prefix blocks agree
on both sides. The tiny vLLM helper (e2e/vllmcpu) trains the same kind of tokenizer; it is reused when
present so one tokenizer serves the sim, real vLLM and the benchmark.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / ".cache" / "bench"
VOCAB_SIZE = 2048


def _train_own(out: Path) -> None:
    """A byte-level BPE trained on generated English-like text (fallback when e2e/vllmcpu is absent)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = ("the of and to in is you that it was for on are as with they at be this have from or one "
             "had by word but not what all were we when your can said there use each which she do how "
             "their if will up other about out many then them these so some her would make like him into "
             "time has look two more write go see number no way could people my than first water been "
             "call who now find long down day did get come made may part cache token prefix block").split()
    rnd = random.Random(7)
    lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 30))) + "." for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def ensure_tokenizer(cache_dir: Path | None = None) -> Path:
    """A folder with tokenizer.json and tokenizer_config.json, made once and reused."""
    out = Path(cache_dir or DEFAULT_CACHE) / "tokenizer"
    if (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    tmp = out.with_name(f"tokenizer.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        from e2e.vllmcpu.make_model_script import make_tokenizer  # same recipe as the tiny vLLM model
    except ImportError:
        make_tokenizer = None
    if make_tokenizer is not None:
        make_tokenizer(tmp)
    else:
        _train_own(tmp)
    cfg_path = tmp / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # aiperf (transformers) checks prompt lengths against this; Mooncake prompts run to 190K tokens.
    cfg["model_max_length"] = 1 << 20
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    try:
        tmp.rename(out)
    except OSError:  # another process made it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


HUB_REPO_ID = "kvswitch/bench-tokenizer"
_HUB_REVISION = "0" * 40


def ensure_hub_cache(cache_dir: Path | None = None) -> tuple[str, dict[str, str]]:
    """The tokenizer laid out as a Hugging Face hub cache entry: (repo id, environment for aiperf).

    aiperf 0.13 loads tokenizers in its worker processes with ``HF_HUB_OFFLINE=1`` forced, and in that
    mode it resolves even a local folder through ``snapshot_download(local_files_only=True)``, which
    rejects paths. A cache entry (refs/main -> snapshots/<rev>/) under our own ``HF_HUB_CACHE`` loads
    in both the parent and the workers without any network access.
    """
    folder = ensure_tokenizer(cache_dir)
    hub = Path(cache_dir or DEFAULT_CACHE) / "hf-hub"
    entry = hub / ("models--" + HUB_REPO_ID.replace("/", "--"))
    snap = entry / "snapshots" / _HUB_REVISION
    if not (snap / "tokenizer.json").exists():
        snap.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            if f.is_file():
                (snap / f.name).write_bytes(f.read_bytes())
        (entry / "refs").mkdir(exist_ok=True)
        (entry / "refs" / "main").write_text(_HUB_REVISION)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    return HUB_REPO_ID, env
