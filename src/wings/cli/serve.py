"""`wings serve MODEL_DIR`: an OpenAI-compatible chat-completions server (and a web page) for a saved model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import CLIError
from .args import text

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI chat-completions API, with a web page",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a saved Wings/LLaVA model directory")
    p.add_argument("--host", default="127.0.0.1", type=text, help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8", "nf4"],
                   help="LLM linear layers in 8-bit or 4-bit NF4 (bitsandbytes); Wings parts, projector and vision "
                        "tower stay in --dtype")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice); 1 suits small models and shared machines")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                   help="most requests run together in one batched generate")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="most requests waiting per model; more get 429 with Retry-After")
    p.add_argument("--scheduler", default="continuous", choices=["continuous", "waves"],
                   help="continuous: requests join the running batch between decode steps; waves: one batched "
                        "generate at a time, newcomers wait for the next (for comparison)")
    p.add_argument("--max-prefill-tokens", type=int, default=4096, metavar="N",
                   help="prompt tokens prefilled per iteration of the running batch (bounds how long running "
                        "streams pause for newcomers; a longer prompt is still admitted alone)")
    p.add_argument("--image-cache-size", type=int, default=256, metavar="N",
                   help="images whose projected features are kept (LRU, keyed by the pixels' sha256); 0: off")
    p.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                   help="on SIGTERM: refuse new requests (503), let those in flight finish for up to S seconds, "
                        "then exit 0")
    p.add_argument("--api-key", default=None, metavar="KEY", type=text,
                   help="require `Authorization: Bearer KEY` (default: the WINGS_API_KEY environment variable)")
    p.add_argument("--allow-local-images", default=None, metavar="DIR",
                   help="let requests name image files under DIR (otherwise only data URLs)")
    p.add_argument("--allow-remote-images", action="store_true", help="let the server fetch http(s) image URLs")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="most images per request")
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more pixels (default: wings.images' limit, 64 Mpx)")
    p.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                   help="answer length when a request sets no max_tokens")
    p.add_argument("--served-model-name", default=None, metavar="NAME", type=text,
                   help="the model's name in the API (default: the directory's name)")
    p.add_argument("--compare", default=None, metavar="BASELINE_DIR",
                   help="also serve this model; the web page shows both answers side by side")
    p.add_argument("--compare-name", default=None, metavar="NAME", type=text, help="the baseline's name in the API")
    p.add_argument("--ui", action=argparse.BooleanOptionalAction, default=True, help="serve the web page at /")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def check_args(args) -> None:
    """Every flag checked before a model is loaded, each problem one line naming the flag."""
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be between 0 and 65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    for flag in ("max_batch_size", "max_queue", "max_images", "default_max_tokens", "max_prefill_tokens"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.image_cache_size < 0:
        raise CLIError(f"--image-cache-size must be at least 0, got {args.image_cache_size}")
    if not args.drain_seconds >= 0:
        raise CLIError(f"--drain-seconds must be at least 0, got {args.drain_seconds}")
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        raise CLIError(f"--max-image-pixels must be at least 1, got {args.max_image_pixels}")
    for flag, path in (("MODEL_DIR", args.model_dir), ("--compare", args.compare)):
        if path is not None and not Path(path).is_dir():
            raise CLIError(f"{flag} {path} is not a directory")
    if args.allow_local_images is not None and not Path(args.allow_local_images).is_dir():
        raise CLIError(f"--allow-local-images {args.allow_local_images} is not a directory")


def load_served(args, model_dir: str, name: str | None, policy):
    """`ServedModel.load`, with --quantize passed on to the loader (`load_chat_model`)."""
    from ..serving import ServedModel

    if args.quantize is None:
        return ServedModel.load(model_dir, name, args.device, args.dtype, policy)
    from ..generation import load_chat_model
    from ..paths import escaped

    model, processor = load_chat_model(model_dir, device=args.device, dtype=args.dtype, quantize=args.quantize)
    return ServedModel(name or escaped(Path(model_dir).resolve().name), model, processor, policy)


def run(args) -> int:
    check_args(args)
    try:
        from ..serving import Server, ServerOptions, ServingPolicy, create_app
        from ..serving.background import bind, serve_forever, url_of
    except ImportError as err:
        raise CLIError(f"wings serve needs the serve extra ({err.name} is missing): "
                       "pip install 'wings-mllm[serve]'") from None
    from dataclasses import replace

    from transformers.utils import logging as hf_logging

    from ..images import DEFAULT_LIMITS
    from ..paths import escaped, lone_surrogate

    api_key = args.api_key or os.environ.get("WINGS_API_KEY") or None
    if api_key and lone_surrogate(api_key):  # (a flag was checked by argparse; the variable was not)
        raise CLIError("WINGS_API_KEY holds bytes that are not valid text in this system's encoding")
    if args.host not in LOOPBACK and not api_key:
        print(f"wings serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              "address can use the model (set --api-key or WINGS_API_KEY)", file=sys.stderr)
    limits = DEFAULT_LIMITS if args.max_image_pixels is None else replace(DEFAULT_LIMITS,
                                                                          max_pixels=args.max_image_pixels)
    policy = ServingPolicy(image_limits=limits, max_images=args.max_images,
                           local_images_root=Path(args.allow_local_images).resolve() if args.allow_local_images
                           else None, allow_remote_images=args.allow_remote_images,
                           default_max_tokens=args.default_max_tokens)
    sock = bind(args.host, args.port)  # fail on a busy port before spending time on loading
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    models = [load_served(args, args.model_dir, args.served_model_name, policy)]
    if args.compare:
        name = args.compare_name
        if name is None:
            name = escaped(Path(args.compare).resolve().name)  # a folder name need not be UTF-8
            name = f"{name}-baseline" if name == models[0].name else name
        models.append(load_served(args, args.compare, name, policy))
    options = ServerOptions(api_key=api_key, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                            ui=args.ui, scheduler=args.scheduler, max_prefill_tokens=args.max_prefill_tokens,
                            image_cache_size=args.image_cache_size, drain_seconds=args.drain_seconds)
    server = Server(models, options, compare=args.compare is not None)
    url = url_of(sock)
    names = ", ".join(m.name for m in models)
    print(f"wings serve: {names} at {url}/v1 (OpenAI chat completions)" + (f"; web page: {url}/" if args.ui else ""),
          file=sys.stderr, flush=True)
    serve_forever(create_app(server), sock, log_level=args.log_level, drain=server)
    print("wings serve: stopped", file=sys.stderr)
    return 0
