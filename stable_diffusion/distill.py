"""Progressive distillation (Salimans & Ho 2022) of a v1 model's DDIM sampler: `python -m stable_diffusion.distill`.

Each round trains a student that takes ONE DDIM step where its teacher takes TWO: by default 8 -> 4 -> 2, and
`--start-steps 32` runs the whole 32 -> 16 -> 8 -> 4 -> 2 chain. The default is what made the shipped student
on one core of this CPU: the guided 8-step DDIM teacher, 3,000 optimizer steps of batch 4 per round (about 15
CPU minutes, capped at 30) with a cosine learning-rate decay -- a small fraction of what the paper spends. The
student of a round is the teacher of the next, initialised from its weights.

Choices (see README "Fewer steps"):
- Guided teacher (Meng et al., "On distillation of guided diffusion models"): the first round's teacher is the
  model under classifier-free guidance (`--guidance`, 7.5 as the sweep default) -- two UNet passes per step --
  and every student learns the *guided* update from the text condition alone, so it samples with guidance 1
  (one pass per step). Later teachers are students, already guided.
- Epsilon prediction, kept from the teacher: the student stays a drop-in UNet for the v1 DDIM sampler and
  starts exactly at its teacher. Salimans & Ho switch to v/x-prediction because eps -> x0 divides by alpha,
  which explodes where SNR -> 0; the v1 schedule never gets there (alpha_bar >= 0.0047, and the first step of
  a <= 32-step "leading" schedule is t <= 962), and the loss is taken in x-space with their "truncated SNR"
  weight max(SNR, 1), so large-noise steps are not over-weighted.
- Student times are exactly the timesteps the v1 DDIM sampler visits with that step count ("leading" spacing,
  offset 1). The teacher's middle point is (t + t_next) // 2; for 32->16, 8->4 and 4->2 it lies on the
  teacher's own grid, for 16->8 (1000 // 8 != 2 * (1000 // 16)) up to 7 timesteps off it. The last step
  (t=1 -> alpha_bar[0]) has no middle point: its target is the teacher's own single step. At the first time
  the sampler feeds pure noise, so half of those training inputs are pure noise, as at inference.

Data: latents of generator images of the built-in shapes dataset (train split), encoded by the model's VAE;
captions as in training. Resumable: `<work-dir>/state.pt` (tensors and plain values only, loaded with
weights_only=True, written atomically) every `--save-every` steps; `--resume` continues. Each round's student
is saved as a UNet-only v1 CompVis safetensors file `<out-dir>/<stem>-distilled-<N>steps.safetensors` (fp16).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_model, load_unet_into, save_checkpoint
from .config import get_config
from .defaults import REPO_ROOT, WEIGHTS_DIR, embedded_checkpoint
from .errors import InputError, SDBenchError
from .samplers import DDIMSampler
from .tokenizer import CLIPTokenizer
from .train import Pool, check_lr_schedule, lr_at

log = logging.getLogger("stable_diffusion.distill")


@dataclass
class DistillConfig:
    checkpoint: str = ""  # teacher model (default: the embedded tiny-shapes model)
    config: str = ""  # its preset (default: recognised from the tensor shapes)
    out_dir: str = str(WEIGHTS_DIR)
    work_dir: str = str(REPO_ROOT / "data" / "cache" / "distill-tiny-shapes")
    start_steps: int = 8  # the guided teacher sampler's step count (see the module doc)
    end_steps: int = 2  # the last student's
    guidance: float = 7.5
    pool: int = 512
    batch: int = 4
    lr: float = 5e-4  # the tiny model trained at 1e-3; few steps per round need a brisk rate
    # "cosine": each round's rate decays to lr_min_frac of lr over round_steps (a noisy last Adam iterate at the
    # full rate is a worse student); "constant" is how the first shipped student was made
    lr_schedule: str = "cosine"
    lr_min_frac: float = 0.05
    round_steps: int = 3000  # optimizer steps per round (or round_minutes, whichever first)
    round_minutes: float = 30.0  # CPU minutes of this process
    save_every: int = 25
    seed: int = 0
    threads: int = 0
    fp16: bool = True


def student_path(out_dir: str | Path, teacher: str | Path, steps: int) -> Path:
    """Where the student sampling with `steps` DDIM steps is saved (name derived from the teacher file)."""
    return Path(out_dir) / f"{Path(teacher).stem}-distilled-{steps}steps.safetensors"


def unet_fingerprint(unet: nn.Module) -> str:
    """sha256 of a UNet's weights rounded to fp16 (how models ship): names the model a student was distilled from."""
    h = hashlib.sha256()
    for name, t in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ddim_jump(z: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM (eta=0) update from alpha_bar a_t to a_s: the arithmetic of `DDIMSampler._step`."""
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_s**0.5 * x0 + (1 - a_s) ** 0.5 * eps


def x_target(z_t: torch.Tensor, z_s: torch.Tensor, a_t: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """The x0 that makes one DDIM jump from (z_t, a_t) land on z_s (Salimans & Ho, Algorithm 2)."""
    r = ((1 - a_s) / (1 - a_t)) ** 0.5
    return (z_s - r * z_t) / (a_s**0.5 - r * a_t**0.5)


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


class Distiller:
    """One chain of rounds; `round_of` is the current student's step count."""

    def __init__(self, dc: DistillConfig, progress: bool = True) -> None:
        if dc.start_steps < 2 or dc.end_steps < 1 or dc.end_steps >= dc.start_steps:
            raise InputError("need --start-steps >= 2 and 1 <= --end-steps < --start-steps")
        check_lr_schedule(dc.lr_schedule)
        n, chain = dc.start_steps, []
        while n // 2 >= dc.end_steps:
            n //= 2
            chain.append(n)
        self.dc, self.chain, self.progress = dc, chain, progress
        self.checkpoint = Path(dc.checkpoint) if dc.checkpoint else embedded_checkpoint()
        self.work = Path(dc.work_dir)
        preset = get_config(dc.config) if dc.config else None
        self.base = load_model(self.checkpoint, preset)  # frozen: VAE, text encoder, round-1 teacher
        self.sampler = DDIMSampler(self.base.cfg)
        self.tokenizer = CLIPTokenizer(max_length=self.base.cfg.clip.max_length)
        self._data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.round_of = chain[0]
        self.step, self.elapsed, self.history = 0, 0.0, []
        self.rounds: dict[str, dict[str, float]] = {}  # steps -> {"minutes", "steps", "loss"} of finished rounds
        self._start_round(chain[0])

    # -- models ------------------------------------------------------------------------------------------
    def _teacher_file(self, student_steps: int) -> Path | None:
        """The previous round's student, or None for the first round (the guided base model)."""
        if student_steps == self.chain[0]:
            return None
        return student_path(self.dc.out_dir, self.checkpoint, student_steps * 2)

    def _start_round(self, steps: int) -> None:
        self.round_of, self.step, self.elapsed, self.history = steps, 0, 0.0, []
        source = self._teacher_file(steps)
        self.teacher = copy.deepcopy(self.base).requires_grad_(False)
        if source is not None:
            load_unet_into(self.teacher, source)
        self.teacher.eval()
        self.student = copy.deepcopy(self.teacher.unet).train().requires_grad_(True)
        self.opt = torch.optim.Adam(self.student.parameters(), lr=self.dc.lr)
        self.sampler.set_timesteps(steps)

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent means, stds, caption contexts, empty-prompt context) of the pool, computed once."""
        if self._data is None:
            pool = Pool(self.base.cfg, self.dc.pool, self.dc.seed, self.tokenizer)
            with torch.no_grad():
                enc = [self.base.vae.encode(pool.pixels(torch.arange(s, min(s + 64, len(pool)))))
                       for s in range(0, len(pool), 64)]  # fmt: skip
                ctx = torch.cat([self.base.text_encoder(pool.ids[s : s + 64]) for s in range(0, len(pool), 64)])
                empty = self.base.text_encoder(pool.empty_ids[None])
            self._data = (torch.cat([m for m, _ in enc]), torch.cat([s for _, s in enc]), ctx, empty)
        return self._data

    # -- the loss ----------------------------------------------------------------------------------------
    def teacher_eps(self, z: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        unet = self.teacher.unet
        if self._teacher_file(self.round_of) is not None or self.dc.guidance <= 1.0:
            return unet(z, t, ctx)
        _, _, _, empty = self.data()
        uncond, cond = unet(torch.cat([z, z]), torch.cat([t, t]), torch.cat([empty.expand_as(ctx), ctx])).chunk(2)
        return uncond + self.dc.guidance * (cond - uncond)

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_t, t index into the student grid, context, target x0) for one training step, drawn with `gen`."""
        means, stds, ctxs, _ = self.data()
        cfg, b = self.base.cfg, self.dc.batch
        idx = torch.randint(len(means), (b,), generator=gen)
        x0 = cfg.scale_factor * (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen))
        ts = self.sampler.timesteps
        i = torch.randint(len(ts), (b,), generator=gen)
        a_t, a_s, a_m = self.alphas(i)
        noise = torch.randn(x0.shape, generator=gen)
        z = _bcast(a_t) ** 0.5 * x0 + _bcast(1 - a_t) ** 0.5 * noise
        pure = (i == 0) & (torch.rand(b, generator=gen) < 0.5)  # the sampler's real first input
        z = torch.where(_bcast(pure), noise, z)
        ctx = ctxs[idx]
        t = ts[i]
        with torch.no_grad():
            last = ts[i] == ts[-1]
            t_mid = torch.where(last, t, (t + self._next_t(i)) // 2)
            z_mid = ddim_jump(z, self.teacher_eps(z, t, ctx), _bcast(a_t), _bcast(a_m))
            z_end = ddim_jump(z_mid, self.teacher_eps(z_mid, t_mid, ctx), _bcast(a_m), _bcast(a_s))
            z_end = torch.where(_bcast(last), z_mid, z_end)  # last step: the teacher's single step
            target = x_target(z, z_end, _bcast(a_t), _bcast(a_s))
        return z, i, ctx, target

    def _next_t(self, i: torch.Tensor) -> torch.Tensor:
        """The student's next timestep after grid index i (-1 = the end, alpha_bar[0])."""
        ts = self.sampler.timesteps
        return torch.cat([ts[1:], ts.new_tensor([-1])])[i]

    def alphas(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha_bar at the student's time, its next time, and the teacher's middle point (= next, last step)."""
        ts, ac = self.sampler.timesteps, self.sampler.alphas_cumprod
        t, s = ts[i], self._next_t(i)
        a_s = torch.stack([self.sampler._alpha_prev(int(v)) for v in s])
        a_m = torch.where(s < 0, a_s, ac[((t + s) // 2).clamp(min=0)])
        return ac[t], a_s, a_m

    def loss(self, z: torch.Tensor, i: torch.Tensor, ctx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Truncated-SNR-weighted x-space MSE of the student's one-step x0 against the teacher's two-step one."""
        a_t = self.alphas(i)[0]
        eps = self.student(z, self.sampler.timesteps[i], ctx)
        x_hat = (z - _bcast(1 - a_t) ** 0.5 * eps) / _bcast(a_t) ** 0.5
        weight = torch.clamp(a_t / (1 - a_t), min=1.0)
        return (weight * (x_hat - target).square().mean(dim=(1, 2, 3))).mean()

    def train_step(self, gen: torch.Generator) -> float:
        dc = self.dc
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, dc.lr, 0, dc.lr_schedule, dc.round_steps, dc.lr_min_frac)
        loss = self.loss(*self.batch(gen))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())

    def advance(self) -> None:
        """One optimizer step on the batch this round and step number determine (so a resumed run repeats it)."""
        dc = self.dc
        gen = torch.Generator().manual_seed(dc.seed * 1_000_003 + self.round_of * 10_007 + self.step)
        self.history.append(self.train_step(gen))
        self.step += 1

    # -- state -------------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.work / "state.pt"

    def save_state(self) -> None:
        state = {
            "config": asdict(self.dc), "round_of": self.round_of, "step": self.step, "elapsed": self.elapsed,
            "history": self.history, "rounds": self.rounds, "student": self.student.state_dict(),
            "opt": self.opt.state_dict(),
        }  # fmt: skip
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def load_state(self) -> None:
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if state["round_of"] not in self.chain:
            raise InputError(f"{self.state_path} is at a {state['round_of']}-step round, not in this chain")
        self.rounds = state["rounds"]
        self._start_round(state["round_of"])
        self.step, self.elapsed, self.history = state["step"], state["elapsed"], state["history"]
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["opt"])
        log.info("resumed %s: %d-step round, step %d", self.state_path, self.round_of, self.step)

    # -- the chain ---------------------------------------------------------------------------------------
    def run_round(self) -> Path:
        dc, n = self.dc, self.round_of
        bar = tqdm(total=dc.round_steps, initial=self.step, desc=f"distill {n * 2}->{n}", disable=not self.progress)
        t_start = time.process_time() - self.elapsed  # CPU seconds: the budget is CPU time
        while self.step < dc.round_steps and time.process_time() - t_start < dc.round_minutes * 60:
            self.advance()
            self.elapsed = time.process_time() - t_start
            bar.update(1)
            recent = sum(self.history[-20:]) / len(self.history[-20:])
            bar.set_postfix(loss=f"{recent:.4f}")
            if self.step % 50 == 0:
                log.info("round ->%d step %d loss %.5f (%.1f CPU min)", n, self.step, recent, self.elapsed / 60)
            if dc.save_every and self.step % dc.save_every == 0:
                self.save_state()
        bar.close()
        tail = self.history[-50:]
        self.rounds[str(n)] = {"minutes": self.elapsed / 60, "steps": self.step, "loss": sum(tail) / len(tail)}
        log.info("round %d->%d: %d steps, %.1f min, loss %.5f", n * 2, n, self.step, self.elapsed / 60, tail[-1])
        return self.export(n)

    def export(self, steps: int) -> Path:
        student = copy.deepcopy(self.student)
        if self.dc.fp16:
            student = student.half()
        meta = {
            "distill_steps": str(steps),
            "distill_guidance": str(self.dc.guidance),
            "distill_teacher": self.checkpoint.name,
            "distill_base_unet": unet_fingerprint(self.base.unet),  # the distilled-from model, whatever its file name
            "distill_round": json.dumps(self.rounds[str(steps)]),
        }
        path = student_path(self.dc.out_dir, self.checkpoint, steps)
        out = save_checkpoint(student, path, self.base.cfg, component="unet", metadata=meta)
        log.info("saved %s (%.1f MB)", out, out.stat().st_size / 1e6)
        return out

    def run(self, resume: bool = False) -> list[Path]:
        if resume and self.state_path.exists():
            self.load_state()
        out = []
        for n in self.chain:
            if str(n) in self.rounds:
                out.append(student_path(self.dc.out_dir, self.checkpoint, n))
                continue
            if n != self.round_of:
                self._start_round(n)
            out.append(self.run_round())
            self.save_state()
        return out


def parse_args(argv: list[str] | None = None) -> tuple[DistillConfig, bool, bool]:
    p = argparse.ArgumentParser(prog="python -m stable_diffusion.distill", description=__doc__.split("\n")[0])
    for f in fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[str(f.type)], default=f.default)
    p.add_argument("--resume", action="store_true", help="continue from <work-dir>/state.pt")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return DistillConfig(**{f.name: getattr(a, f.name) for f in fields(DistillConfig)}), a.resume, not a.no_progress


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dc, resume, progress = parse_args(argv)
    if dc.threads:
        torch.set_num_threads(dc.threads)
    try:
        d = Distiller(dc, progress=progress)
        paths = d.run(resume=resume)
    except SDBenchError as e:  # a bad flag or file (InputError, CheckpointError): a message, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    for n, r in d.rounds.items():
        print(f"round {int(n) * 2}->{n}: {r['steps']} steps, {r['minutes']:.1f} CPU min, loss {r['loss']:.5f}")
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
