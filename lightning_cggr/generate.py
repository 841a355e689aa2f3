"""Sample text from a trained model: an exported folder, a run folder or a checkpoint.

    python -m lightning_cggr.generate my-model "The for statement"
    python -m lightning_cggr.generate outputs/2026-11-27/10-00-00 "What is a list?" --chat

Plain prompts print the prompt and its continuation. ``--chat`` (the default when the tokenizer
has a chat template) sends the prompt as a user message through the template and prints the
assistant's reply only. Sampling is seeded (``--seed``); ``--temperature 0`` is greedy decoding.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from .cli import add_version_option
from .errors import UserError, run_command
from .export import DTYPES, _quiet_transformers, load_trained
from .models.positions import declared_positions, learned_position_table


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """The sampling settings, each checked on its own (a NaN or infinite one included): UserError naming it."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={max_new_tokens}: must be >= 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature={temperature}: must be a finite number >= 0 (0: greedy)")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise UserError(f"--top-p={top_p}: must be in (0, 1] (1: no nucleus cut)")


def check_positions(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """A model with a learned position table (GPT-2, OPT) cannot look past its last row: generating
    further ended in an IndexError from inside the model. UserError naming the most that fits."""
    declared = declared_positions(model)
    if declared is None or prompt_tokens + max_new_tokens <= declared[1]:
        return
    name, count = declared
    if learned_position_table(model, count) is None:
        return  # computed positions (rotary, ALiBi): it runs, past the lengths it was trained on
    where = f"this model has {count} learned positions ({name})"
    if prompt_tokens >= count:
        raise UserError(f"the prompt is {prompt_tokens} tokens, and {where}: shorten the prompt")
    raise UserError(f"--max-new-tokens={max_new_tokens} after a {prompt_tokens}-token prompt needs "
                    f"{prompt_tokens + max_new_tokens} positions, and {where}; lower --max-new-tokens to at "
                    f"most {count - prompt_tokens}")


def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    chat: bool | None = None,
) -> str:
    """The prompt and its sampled continuation (``chat``: the assistant's reply only).

    ``chat=None`` uses the chat template when the tokenizer has one."""
    if not prompt:
        raise UserError("the prompt is empty; give the text to continue")
    check_sampling(max_new_tokens, temperature, top_p)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat and not has_template:
        raise UserError("--chat: this model's tokenizer has no chat template; leave --chat out")
    chat = has_template if chat is None else chat
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
    check_positions(model, ids.shape[1], max_new_tokens)
    ids = ids.to(next(model.parameters()).device)
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling
        )
    if chat:
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_cggr.generate",
        description="Sample a continuation of a prompt from an exported folder, a run folder or a checkpoint.",
    )
    parser.add_argument("source", help="an exported folder (lightning_cggr.export), a run folder or a checkpoint")
    parser.add_argument("prompt", help="the text to continue (with --chat: the user's message)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="use the tokenizer's chat template (default: when it has one)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights' dtype (default: as saved)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    add_version_option(parser)
    return parser


def check_device(device: str) -> torch.device:
    """``--device`` as a torch device that can hold this model's tensors here: UserError otherwise."""
    try:
        parsed = torch.device(device)
        torch.empty(1, device=parsed)  # an unavailable backend raises here, not after the model loads
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"--device={device}: {' '.join(str(err).split())[:200]}") from err
    if parsed.type == "meta":
        raise UserError("--device=meta: meta tensors hold no values, so nothing can be sampled; use cpu or cuda")
    return parsed


def _run(args: argparse.Namespace) -> str:
    check_sampling(args.max_new_tokens, args.temperature, args.top_p)  # before seconds of loading
    device = check_device(args.device)
    model, tokenizer = load_trained(args.source, args.dtype)
    model.to(device)
    return generate_text(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, chat=args.chat,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_cggr.generate`` / ``lightning-cggr-generate``; a mistake exits 2 with one line."""
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    text = run_command(_run, args)
    print(text)
    if not text.strip():  # a chat reply that ended at once: an empty line alone looked like a failure
        print("(the model's reply is empty: the first token it chose ends its turn; try --temperature above 0 "
              "or another --seed)", file=sys.stderr)


if __name__ == "__main__":
    main()
