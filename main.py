"""sdbench command line.

    python main.py --sweep prune [--ratios 0,0.3,0.5 ...]   # the benchmark: one CSV row per setting
    python main.py generate --prompt "..."                   # sample images with our Stable Diffusion stack

User errors (bad files, options, values) print one clear message and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import time
from pathlib import Path

try:  # Ctrl-C while torch imports (seconds): one line, not a traceback
    import torch

    from bench.cli import add_sweep_args, parse_resolution
    from stable_diffusion.config import PRESETS
    from stable_diffusion.errors import InputError, SDBenchError, first_line
    from stable_diffusion.pipeline import DTYPES, check_device, load_pipeline
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    sys.exit(130)

log = logging.getLogger("sdbench")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a model."""
    p.add_argument("--checkpoint", type=Path, help="v1 .ckpt/.safetensors (default: the embedded tiny model)")
    p.add_argument("--config", choices=sorted(PRESETS), help="model preset (default: recognised from the file)")
    p.add_argument("--unet", type=Path, help="replace the UNet with one from this (partial) checkpoint")
    p.add_argument(
        "--unsafe-load", action="store_true", help="allow pickles that need code to load (trusted files only)"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


# Output-disk failures that are the user's to fix (full, read-only, no permission): one line, exit 2.
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the project's rule for every user error), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="main.py", description="Stable Diffusion v1 compression benchmark")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_model_args(parser)
    parser.add_argument("--resolution", type=parse_resolution, help="N or WxH pixels (default: the preset's)")
    add_sweep_args(parser)
    parser.set_defaults(func=cmd_sweep)
    sub = parser.add_subparsers(dest="command", metavar="{generate}", parser_class=OneLineParser)

    g = sub.add_parser("generate", help="text -> image (or image -> image) with our Stable Diffusion stack")
    add_model_args(g)
    g.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--sampler", default="pndm", help="ddim, pndm (plms), ddpm or euler")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resolution", type=parse_resolution, help="N or WxH pixels (default: the preset's)")
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    g.add_argument("--init-image", type=Path, help="img2img: start from this image")
    g.add_argument("--strength", type=float, default=0.8, help="img2img: how much of the schedule to run")
    g.add_argument("--out", type=Path, help="output folder (default: results/generate/<time>)")
    g.set_defaults(func=cmd_generate)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    sd = load_pipeline(args.checkpoint, args.config, args.unet, args.dtype, args.device, args.unsafe_load)
    log.info("model %s (%s, %s)", sd.cfg.name, args.dtype, args.device)
    height, width = args.resolution or (None, None)
    result = sd(
        args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        sampler=args.sampler,
        guidance=args.guidance,
        seed=args.seed,
        height=height,
        width=width,
        batch=args.batch,
        eta=args.eta,
        init_image=args.init_image,
        strength=args.strength,
    )
    out = args.out or Path("results") / "generate" / time.strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder {out}: {e}") from None
    for i, image in enumerate(result.images):
        path = out / f"{i // args.batch:02d}-{i % args.batch:02d}-seed{args.seed}.png"
        image.save(path)
        log.info("wrote %s", path)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from bench.cli import options_from_args
    from bench.runner import Runner, set_threads
    from bench.sweep import SweepPlan

    options = options_from_args(args, args.resolution)
    check_device(args.device)  # before accelerate picks a device of its own
    state = PartialState(cpu=args.device == "cpu")
    set_threads(state)
    plan = SweepPlan(options, device=state.device, is_main=state.is_main_process)
    run_dir = Runner(plan, state).run()
    if state.is_main_process:
        log.info("done: %s (results.csv, manifest.json, images/, plots/)", run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None and not (args.sweep or args.config_file):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except SDBenchError as e:
        log.error("%s", e)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        log.error("cannot write the output%s: %s; free space or pass a writable --out", where, first_line(e))
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # outside main's own handler (argument parsing, logging set-up)
        sys.stderr.write("interrupted\n")
        sys.exit(130)
