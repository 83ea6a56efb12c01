"""The Bedrock check: load an artifact under transformers 4.51.3 (the version Bedrock serves imported
models with) in a subprocess, and compare what it computes with the trained model.

    result = check_artifact(folder, reference=(model, tokenizer, prompts))   # export: the merged model
    result = check_artifact(folder)                                          # validate: a folder alone
    result["status"]    # "passed", "failed" or "not run"
    result["message"]   # the sentence the manifest, model card and report print

Bedrock's interpreter is the Python of a virtual environment with transformers==4.51.3
(`make install` builds it as .venv-bedrock/). It is found, in this order:

1. TERMTUNE_BEDROCK_PYTHON, when set (set it empty to turn the check off);
2. .venv-bedrock/bin/python in the termtune checkout, then in the current directory.

Not found, the check does not run and every output says so ("not checked"); it is never claimed.

Compared, on a few probe prompts (data.prompt_template filled with fixed medical terms):
- the token ids of the prompts (the artifact's tokenizer files read by 4.51.3 vs the trained tokenizer);
- the greedy tokens, exactly: NEW_TOKENS new tokens per prompt, end-of-sequence not allowed early,
  so every probe compares the same number of tokens; where a probe's tokens part at a near-tie (the two
  candidates' logits within the tolerance) it is reported as such, not counted as equal nor as a failure;
- the logits with the reference's tokens fed as decoder input (teacher forcing), within TOLERANCE
  (fp32) or BF16_STEPS rounding steps of the largest logit (bf16).

Both sides compute in the artifact's dtype (4.51.3 loads it with torch_dtype="auto", as Bedrock reads
config.json's torch_dtype; the reference is the merged model cast to that dtype), so a bf16 export is
compared with bf16 computation, not with the fp32 model it was rounded from. A decoder-only model's bf16 or
fp16 artifact is the exception: both sides hold its rounded weights but compute in fp32 (COMPARE_IN_FP32), since
over a real model's 30 layers the two versions' half-precision kernels part by more than rounding (SmolLM2-135M:
max |logit difference| 1.1-1.8 in bf16 with every greedy token equal; in fp32 from the same bf16 weights: 0).

Without a trained model (`termtune validate DIR`: as_validation_check) the check loads the folder and
generates on the probes; when the folder's manifest.json holds the greedy tokens that export recorded,
they must match.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from termtune.validate import Check

PYTHON_ENV = "TERMTUNE_BEDROCK_PYTHON"
BEDROCK_TRANSFORMERS = "4.51.3"
PROBE_TERMS = ("Hypertension", "Paget's disease of bone", "café-au-lait macules", "Asthma")
NEW_TOKENS = 16
TIMEOUT_SECONDS = 1800  # loading a multi-GB artifact on a busy CPU takes minutes, not hours

TOLERANCE = 1e-4
"""Max |logit difference| allowed for an fp32 artifact. Both sides run the same weights through the same
ops; what differs is how the two transformers versions order and round them. fp32 keeps 24 significant
bits (~6e-8 relative per op), which keeps logits of size ~10-100 far within 1e-4 (measured: 0)."""
COMPARE_IN_FP32 = ("bfloat16", "float16")
"""A decoder-only artifact in these dtypes is compared in fp32 computation (see the module docstring)."""
BF16_STEPS = 4
"""For bf16 the tolerance is this many bf16 steps (ulps) of the largest |logit|. bf16 keeps 8 significant
bits, so a logit in [2^e, 2^(e+1)) is only known to 2^(e-7), and the logits themselves come out in bf16:
one op rounded differently upstream moves a logit by a step or two. Measured on a random model of the
default base model's shape: 0.19 with logits up to ~40 (one step is 0.25); on the test models: 0. A wrong weight, a tied
or rescaled head moves logits by far more than 4 steps."""


# ----------------------------------------------------------------------------- the entry point


def check_artifact(folder: Path, reference: tuple["PreTrainedModel", "PreTrainedTokenizerBase", Sequence[str]]
                   | None = None) -> dict[str, Any]:
    """Load `folder` under transformers 4.51.3 and compare it with `reference` (model, tokenizer, prompts),
    or, without one, with the greedy tokens its manifest recorded (if any). Never raises for a failed or
    impossible check: the result says what happened. The reference model is cast to the artifact's
    dtype in place (export is done with it)."""
    python, why_not = bedrock_python()
    if python is None:
        return {"status": "not run", "message": f"not checked under transformers {BEDROCK_TRANSFORMERS}: {why_not}"}
    started = time.time()
    dtype = _artifact_dtype(folder)
    compute = _compute_dtype(folder, dtype)
    if reference is not None:
        model, tokenizer, prompts = reference
        expected = _reference_outputs(model, tokenizer, list(prompts), dtype, compute)
    else:
        expected = _recorded_outputs(folder)
        prompts = expected["prompts"] if expected else probe_prompts()
    with tempfile.TemporaryDirectory(prefix="termtune-bedrock-check-") as tmp:
        done, outputs = _run_bedrock(python, folder, list(prompts), expected, Path(tmp), compute)
    result: dict[str, Any] = {"python": str(python), "dtype": dtype, "probes": len(prompts), "new_tokens": NEW_TOKENS,
                              "seconds": round(time.time() - started, 1)}
    if compute != dtype:
        result["compute_dtype"] = compute
    if done is None:
        return {**result, "status": "not run", "message": f"not checked under transformers {BEDROCK_TRANSFORMERS}: "
                f"{python} did not finish within {TIMEOUT_SECONDS} s"}
    try:
        info = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (IndexError, ValueError):
        info = None
    if not isinstance(info, dict):  # it could not even start (a broken interpreter, a crash, a kill)
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**result, "status": "not run", "message": f"not checked under transformers {BEDROCK_TRANSFORMERS}: "
                f"{python} exited with {done.returncode}: {last}"}
    result["transformers"] = info["transformers"]
    if info["transformers"] != BEDROCK_TRANSFORMERS:
        return {**result, "status": "not run", "message": f"not checked under transformers {BEDROCK_TRANSFORMERS}: "
                f"{python} has transformers {info['transformers']}"}
    if "failed" in info:
        error = " ".join(info["error"].split())[:300]
        failed = ("does not load" if info["failed"] == "load" else "loads but cannot generate")
        return {**result, "status": "failed", "message": f"{failed} under transformers {BEDROCK_TRANSFORMERS}: {error}"}
    result.update(_compare(expected, outputs, dtype, has_logits=reference is not None, compute=compute))
    if reference is not None:  # what `termtune validate` later compares the folder with
        result["recorded"] = {"prompts": list(prompts), "tokens": expected["tokens"].tolist()}
    return result


def as_validation_check(folder: Path, earlier: list["Check"]) -> "Check":
    """`termtune validate DIR`'s last check: check_artifact(folder) as one numbered Check (a warning when it
    could not run; not tried on a folder that already fails a preflight rule)."""
    from termtune.validate import Check

    number, name = len(earlier) + 1, f"loads and generates under transformers {BEDROCK_TRANSFORMERS}"
    if any(c.failed for c in earlier):
        return Check(number, name, False, "not run: the folder fails the checks above", warning=True)
    result = check_artifact(folder)
    return Check(number, name, result["status"] == "passed", result["message"], warning=result["status"] == "not run")


def probe_prompts(template: str = "What is {term}?") -> list[str]:
    """The probe prompts: the template (data.prompt_template) filled with PROBE_TERMS."""
    from termtune.data import prompt_for

    return [prompt_for(template, term) for term in PROBE_TERMS]


def bedrock_python() -> tuple[Path | None, str]:
    """(the transformers-4.51.3 interpreter, "") or (None, why it is not there)."""
    if PYTHON_ENV in os.environ:
        value = os.environ[PYTHON_ENV]
        if not value:
            return None, f"turned off ({PYTHON_ENV} is empty)"
        path = Path(value).expanduser()
        return (path, "") if path.is_file() else (None, f"{PYTHON_ENV}={value} is not a file")
    checkout = Path(__file__).resolve().parents[2]
    for folder in dict.fromkeys((checkout, Path.cwd())):
        path = folder / ".venv-bedrock" / "bin" / "python"
        if path.is_file():
            return path, ""
    return None, (f"Bedrock's interpreter was not found (set {PYTHON_ENV} to a Python with transformers=="
                  f"{BEDROCK_TRANSFORMERS}, or run make install)")


# ----------------------------------------------------------------------------- the two sides


def _artifact_dtype(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    return str(config.get("torch_dtype") or "float32")


def _compute_dtype(folder: Path, dtype: str) -> str:
    """The dtype both sides compute in: the artifact's, or fp32 for a decoder-only model's half-precision artifact
    (see the module docstring)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return dtype
    causal = isinstance(config, dict) and not config.get("is_encoder_decoder", False)
    return "float32" if causal and dtype in COMPARE_IN_FP32 else dtype


def _reference_outputs(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", prompts: list[str],
                       dtype: str, compute: str) -> dict[str, Any]:
    import torch

    from termtune.families import family_of_model

    # As 4.51.3 computes this family (its attention implementation there): in bf16 two attention kernels
    # alone move a random-init model's logits by ~0.7 and flip greedy tokens; in fp32 by ~3e-5.
    model.set_attn_implementation(family_of_model(model).bedrock_attention)
    model.to(getattr(torch, dtype)).to(getattr(torch, compute)).eval()  # the artifact's rounded weights
    _fresh_rotary_frequencies(model)
    causal = not model.config.is_encoder_decoder
    if causal:
        tokenizer.padding_side = "left"  # a decoder-only model continues its prompt (the same in BEDROCK_SCRIPT)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        tokens = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                num_beams=1, pad_token_id=tokenizer.pad_token_id)
        logits = _teacher_forced_logits(model, batch, tokens[:, :-1], causal)
    return {"prompts": prompts, "input_ids": batch["input_ids"], "tokens": tokens, "logits": logits}


def _fresh_rotary_frequencies(model: Any) -> None:
    """Give each rotary embedding the fp32 frequencies a freshly loaded model computes: casting the model to bf16
    (as the export does) rounds these buffers too, though no file holds them and 4.51.3 computes them anew in fp32
    (SmolLM2's bf16-rounded frequencies turn the angle at position 1000 by up to 1.4 radians)."""
    import torch

    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "config"):
            try:
                fresh = type(module)(module.config)
            except TypeError:  # a rotary module built from more than its config: left as it is
                continue
            for name in ("inv_freq", "original_inv_freq"):
                if hasattr(module, name):
                    setattr(module, name, getattr(fresh, name).to(module.inv_freq.device))


def _teacher_forced_logits(model: Any, batch: Any, tokens: Any, causal: bool) -> Any:
    """The logits for `tokens` (the greedy output less its last token) fed back: as decoder input for an
    encoder-decoder; as the whole sequence for a decoder-only model, whose (left) padding gets logits 0 on
    both sides, since what a model computes for a position it never attends to is not the model's output.
    Its positions are given, counted from the first token that is not padding, as generate counts them: left
    alone, 4.51.3 counts them so for GPTBigCode and 5.x from the first column, padding included (learned
    position embeddings then differ by whole logits on a padded row). The same code runs in BEDROCK_SCRIPT."""
    import torch

    if not causal:
        return model(**batch, decoder_input_ids=tokens).logits
    mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens[:, batch["input_ids"].shape[1]:])], dim=1)
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return torch.where(mask.bool()[..., None], logits, torch.zeros_like(logits))


def _recorded_outputs(folder: Path) -> dict[str, Any] | None:
    """The prompts and greedy tokens export recorded in the folder's manifest, if it holds them."""
    import torch

    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        recorded = manifest["bedrock_check"]["recorded"]
        return {"prompts": [str(p) for p in recorded["prompts"]], "tokens": torch.tensor(recorded["tokens"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


BEDROCK_SCRIPT = r"""
import json, sys
import torch, transformers
from safetensors.torch import save_file
from transformers import AutoTokenizer

folder, request, out = sys.argv[1:4]
req = json.load(open(request, encoding="utf-8"))
step = "load"
try:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # the class config.json names, as Bedrock loads it
    architecture = json.load(open(folder + "/config.json", encoding="utf-8"))["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(folder, torch_dtype="auto").eval()
    model.to(getattr(torch, req["compute_dtype"]))
    step = "generate"
    causal = not model.config.is_encoder_decoder
    if causal:
        tokenizer.padding_side = "left"
    batch = tokenizer(req["prompts"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        tokens = model.generate(**batch, max_new_tokens=req["new_tokens"], min_new_tokens=req["new_tokens"],
                                do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)
        decoder = torch.tensor(req["decoder_ids"]) if req["decoder_ids"] is not None else tokens[:, :-1]
        if causal:  # as termtune.bedrock_check._teacher_forced_logits
            mask = torch.cat([batch["attention_mask"], torch.ones_like(decoder[:, batch["input_ids"].shape[1]:])], 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=decoder, attention_mask=mask, position_ids=positions).logits
            logits = torch.where(mask.bool()[..., None], logits, torch.zeros_like(logits))
        else:
            logits = model(**batch, decoder_input_ids=decoder).logits
except Exception as e:
    print(json.dumps({"transformers": transformers.__version__, "failed": step, "error": f"{type(e).__name__}: {e}"}))
    sys.exit(0)
save_file({"input_ids": batch["input_ids"], "tokens": tokens, "logits": logits.contiguous()}, out)
print(json.dumps({"transformers": transformers.__version__, "dtype": str(model.dtype)}))
"""


def _run_bedrock(python: Path, folder: Path, prompts: list[str], expected: dict[str, Any] | None,
                 tmp: Path, compute: str) -> tuple[subprocess.CompletedProcess | None, dict[str, Any]]:
    """Run BEDROCK_SCRIPT on `folder` in Bedrock's interpreter: (the finished process or None on timeout, outputs)."""
    from safetensors.torch import load_file

    request, out = tmp / "request.json", tmp / "out.safetensors"
    decoder_ids = expected["tokens"][:, :-1].tolist() if expected else None  # logits on the expected tokens
    request.write_text(json.dumps({"prompts": prompts, "new_tokens": NEW_TOKENS, "decoder_ids": decoder_ids,
                                   "compute_dtype": compute}), encoding="utf-8")
    # -I: Bedrock's interpreter must import its own packages, never termtune's (PYTHONPATH, user site).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run([str(python), "-I", "-c", BEDROCK_SCRIPT, str(folder), str(request), str(out)],
                              capture_output=True, text=True, env=env, timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return None, {}
    return done, (load_file(out) if done.returncode == 0 and out.is_file() else {})


def _compare(expected: dict[str, Any] | None, got: dict[str, Any], dtype: str, has_logits: bool,
             compute: str | None = None) -> dict[str, Any]:
    """status and message from the two sides' outputs."""
    n = len(got["tokens"])
    probes = f"{n} probe{'s' if n != 1 else ''} × {NEW_TOKENS} tokens"
    compute = compute or dtype
    loaded = f"loaded under transformers {BEDROCK_TRANSFORMERS} ({dtype}" + \
        (f", computed in {compute} on both sides)" if compute != dtype else ")")
    if expected is None:
        return {"status": "passed", "message": f"{loaded} and generated on {probes}; no trained model or recorded "
                "tokens to compare with"}
    if has_logits and not _equal(expected["input_ids"], got["input_ids"]):
        return {"status": "failed", "message": f"{loaded}, but its tokenizer files give other token ids for the "
                "probe prompts than the trained tokenizer"}
    tolerance = logit_tolerance(compute, got["logits"])
    ties, differ = _token_differences(expected["tokens"], got["tokens"], got["logits"], tolerance)
    against = "the trained model's" if has_logits else "those recorded at export"
    equal = n - len(ties) - differ
    text = f"greedy tokens equal {against} on {equal} of {probes}" if equal < n else \
        f"greedy tokens equal {against} on {probes}"
    if ties:
        text += (f"; {len(ties)} part{'s' if len(ties) != 1 else ''} at a near-tie (two candidate tokens within "
                 f"{max(ties):.2g} of each other)")
    if differ:
        text += f"; {differ} differ{'s' if differ == 1 else ''}"
    figures: dict[str, Any] = {"tolerance": tolerance, "near_ties": len(ties), "tokens_differ": differ}
    if has_logits:
        figures["max_abs_logit_diff"] = float((expected["logits"].float() - got["logits"].float()).abs().max())
        text += f", max |Δlogit| {figures['max_abs_logit_diff']:.2g}"
    text += f" (tolerance {tolerance:.2g})"
    if differ or figures.get("max_abs_logit_diff", 0.0) > tolerance:
        return {**figures, "status": "failed", "message": f"{loaded}, but it differs: {text}"}
    return {**figures, "status": "passed", "message": f"{loaded}: {text}"}


def logit_tolerance(dtype: str, logits: Any) -> float:
    """The largest |logit difference| that is rounding, not a different model (see TOLERANCE)."""
    if dtype != "bfloat16":
        return TOLERANCE
    top = float(logits.float().abs().max())
    return BF16_STEPS * 2.0 ** (math.floor(math.log2(max(top, 2.0**-100))) - 7)


def _token_differences(expected: Any, got: Any, got_logits: Any, tolerance: float) -> tuple[list[float], int]:
    """(the logit gap at each probe whose greedy tokens part at a near-tie, how many probes part otherwise).

    At the first token where a probe's two sequences part, 4.51.3's logits there (fed the expected tokens
    so far) rate both candidates; within `tolerance` of each other, either is what greedy decoding of that
    model may pick after a rounding, so the probe proves nothing either way and is not counted as equal."""
    ties, differ = [], 0
    for row, (a, b) in enumerate(zip(expected, got)):
        if _equal(a, b):
            continue
        parted = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
        if not parted or parted[0] == 0:
            differ += 1
            continue
        step = got_logits[row, parted[0] - 1].float()
        gap = abs(float(step[int(a[parted[0]])] - step[int(b[parted[0]])]))
        if gap <= tolerance:
            ties.append(gap)
        else:
            differ += 1
    return ties, differ


def _equal(a: Any, b: Any) -> bool:
    return a.shape == b.shape and bool((a == b).all())
