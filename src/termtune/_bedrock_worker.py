"""termtune serve's model runner: one imported model, generation requests as JSON lines.

termtune serve runs this file as a long-lived process per imported model, with Bedrock's
transformers (4.51.3: the interpreter in TERMTUNE_BEDROCK_PYTHON, or ./.venv-bedrock/bin/python),
as Bedrock hosts each imported model apart from the service. termtune is not installed there, so
this file imports only the standard library, torch and transformers. Without that interpreter,
serve imports this module and calls the same load() and generate() in its own process.

    python -I _bedrock_worker.py MODEL_FOLDER
    out: {"ready": true, "transformers": "4.51.3", "torch": "2.x"}   (or {"ready": false, "error": ...}, exit 1)
    in:  {"prompt": "...", "max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "max_time": 60.0,
          "max_input_tokens": 512, "stream": false}
         or the same with "messages": [{"role": "user", "content": "..."}] instead of "prompt": a
         conversation, which the model's chat template renders (decoder-only models)
    out: {"ids": [...], "text": "...", "pieces": [...] (stream only), "n_prompt": 7, "stopped": true}
         or {"too_long": 600} when the prompt has more than max_input_tokens tokens,
         or {"error": "..."} when generation failed

It ends when its standard input closes. Its standard output carries only these lines: anything
a library prints goes to standard error.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def load(folder: str) -> tuple[Any, Any]:
    """(model, tokenizer) from an imported model's folder: the class its config.json names, safetensors only,
    fp32 on the CPU (bf16 matmuls are many times slower there; the weights are the same)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        architecture = json.load(f)["architectures"][0]
    dtype = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = getattr(transformers, architecture).from_pretrained(folder, use_safetensors=True,
                                                                 **{dtype: torch.float32}).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def generate(model: Any, tokenizer: Any, request: dict) -> dict:
    """One generation, greedy unless temperature > 0, within max_time seconds (then it stops, "length")."""
    import torch

    if "messages" in request:  # rendered once, here; its text already holds the template's special tokens
        if not tokenizer.chat_template:
            return {"error": "the model's tokenizer has no chat template"}
        text = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=False)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(request["prompt"], return_tensors="pt")
    n_prompt = int(enc["input_ids"].shape[1])
    if n_prompt > request["max_input_tokens"]:
        return {"too_long": n_prompt}
    sample = request["temperature"] > 0
    kwargs = {"max_new_tokens": request["max_new_tokens"], "do_sample": sample, "num_beams": 1,
              "max_time": request["max_time"]}
    if sample:
        kwargs.update(temperature=request["temperature"], top_p=request["top_p"])
    if model.config.is_encoder_decoder:
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)[0].tolist()
        ids = out[1:]  # an encoder-decoder's output opens with its start token
        stopped = tokenizer.eos_token_id in ids
        if stopped:
            ids = ids[:ids.index(tokenizer.eos_token_id)]
    else:
        ids, stopped = _decoder_generate(model, tokenizer, enc, kwargs)
    answer = {"ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True), "n_prompt": n_prompt,
              "stopped": stopped}
    if request.get("stream"):  # the text each token adds, as a stream sends it
        pieces, sent = [], ""
        for i in range(1, len(ids) + 1):
            upto = tokenizer.decode(ids[:i], skip_special_tokens=True)
            pieces.append(upto[len(sent):])
            sent = upto
        answer["pieces"] = pieces
    return answer


def _decoder_generate(model: Any, tokenizer: Any, enc: Any, kwargs: dict) -> tuple[list[int], bool]:
    """A decoder-only model's new tokens (its output after the prompt), ended before the first of the
    generation config's eos ids (which list a chat model's end-of-turn token), and whether one came."""
    import torch

    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
    eos = [token for token in eos if token is not None] or None  # None: a model with no eos runs to the limit
    if eos and model.generation_config.pad_token_id is None and tokenizer.pad_token_id is None:
        kwargs = {**kwargs, "pad_token_id": eos[0]}  # what generate picks itself, without its warning
    with torch.no_grad():
        out = model.generate(**enc, **kwargs, eos_token_id=eos)[0].tolist()
    ids = out[int(enc["input_ids"].shape[1]):]
    end = next((i for i, token in enumerate(ids) if token in (eos or ())), None)
    return (ids, False) if end is None else (ids[:end], True)


def main(folder: str) -> int:
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the protocol's own copy of standard output
    os.dup2(2, 1)  # what libraries print goes to standard error
    sys.stdout = sys.stderr

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    try:
        import torch
        import transformers

        model, tokenizer = load(folder)
    except Exception as e:
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    send({"ready": True, "transformers": transformers.__version__, "torch": torch.__version__})
    for line in sys.stdin:
        try:
            send(generate(model, tokenizer, json.loads(line)))
        except Exception as e:  # this request's failure; the model stays loaded for the next
            send({"error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
