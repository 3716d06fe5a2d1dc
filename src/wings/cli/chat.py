"""`wings chat MODEL_DIR [--image PATH ...] [PROMPT]`: one answer, or an interactive multi-turn chat."""

from __future__ import annotations

import argparse
import sys

from . import CLIError
from .args import check_device, positive_float, positive_int, probability, text

REPL_HELP = "commands: /image PATH (attach to the next message), /reset (clear history), /exit"


class _IntermixedParser(argparse.ArgumentParser):
    """Accepts PROMPT after options (`wings chat DIR --image X "question"`), which Python 3.11's argparse
    refuses for an optional positional that follows a required one."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_intermixing", False):  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (one answer with PROMPT, interactive without)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.__class__ = _IntermixedParser  # behaviour only, no new state
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a saved Wings/LLaVA model directory")
    p.add_argument("prompt", metavar="PROMPT", nargs="?", type=text, help="answer this once and exit")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="image for the first message")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8", "nf4"],
                   help="LLM linear layers in 8-bit or 4-bit NF4 (bitsandbytes); Wings parts, projector and vision "
                        "tower stay in --dtype")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=None)
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--repetition-penalty", type=positive_float, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", type=text, help="stop when this text appears")
    p.add_argument("--system", default=None, type=text,
                   help="system prompt (default: none; 'You are a helpful assistant.' for compat=official models)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--no-stream", action="store_true", help="print each answer whole instead of token by token")
    p.set_defaults(func=run)


def generation_settings(args) -> dict:
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    settings: dict = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if not args.do_sample and any(v is not None for v in sampling.values()):
        raise CLIError("--temperature/--top-p/--top-k need --do-sample")
    settings.update({k: v for k, v in sampling.items() if v is not None})
    if args.repetition_penalty is not None:
        settings["repetition_penalty"] = args.repetition_penalty
    if any(not stop for stop in args.stop):
        raise CLIError("--stop needs a non-empty text")
    if args.stop:
        settings["stop_strings"] = list(args.stop)
    return settings


def run(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from ..generation import OFFICIAL_SYSTEM_PROMPT, ChatSession, load_chat_model, load_image
    from ..model_dir import check_model_dir

    settings = generation_settings(args)
    check_device(args.device)
    images = [load_image(path) for path in args.image]  # fail on a bad file before loading the model
    check_model_dir(args.model_dir, "MODEL_DIR", kind="mllm")  # from config.json alone: nothing allocated yet
    hf_logging.disable_progress_bar()  # stdout/stderr are for the conversation
    model, processor = load_chat_model(args.model_dir, device=args.device, dtype=args.dtype, quantize=args.quantize)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    system = args.system
    if system is None and getattr(model.config, "compat", "none") == "official":
        system = OFFICIAL_SYSTEM_PROMPT
    session = ChatSession(model, processor, system_prompt=system, generation=settings)
    session.pending.extend(images)
    if len(images) > 1 and getattr(model.config, "compat", "none") == "official":
        raise CLIError("compat='official' models read one image per conversation")
    if args.prompt is not None:
        answer(session, args.prompt, stream=not args.no_stream)
        return 0
    return repl(session, stream=not args.no_stream)


def answer(session, text: str, stream: bool) -> str:
    """Print the reply to stdout (token by token when streaming) and return it."""
    if not stream:
        reply = session.ask(text)
        print(reply, flush=True)
        return reply
    pieces = []
    for piece in session.ask_stream(text):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    return "".join(pieces)


def repl(session, stream: bool) -> int:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    console.print(f"[bold]wings chat[/bold]: {REPL_HELP}")
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError as err:  # a line that is not valid text in the terminal's encoding
            console.print(f"[red]error:[/red] that line is not valid {err.encoding} text; type it again")
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        try:
            if line == "/reset":
                session.reset()
                console.print("[dim]history cleared[/dim]")
            elif line.startswith("/image"):
                path = line[len("/image"):].strip()
                if not path:
                    raise ValueError("usage: /image PATH")
                session.attach(path)
                console.print(f"[dim]attached {path} to the next message[/dim]")
            elif line.startswith("/"):
                console.print(f"unknown command {line.split()[0]}; {REPL_HELP}")
            else:
                answer(session, line, stream)
        except (ValueError, FileNotFoundError) as err:  # a bad turn must not end the conversation
            console.print(f"[red]error:[/red] {err}")
