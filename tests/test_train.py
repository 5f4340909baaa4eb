"""Training the tiny preset (`stable_diffusion.train`): a few steps lower the loss, write a loadable
checkpoint, and `--resume` continues from the saved step."""

from __future__ import annotations

import torch

from stable_diffusion.checkpoint import load_model, read_state_dict
from stable_diffusion.train import TrainConfig, Trainer, fold_scale, parse_args

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        work_dir=str(tmp_path / "work"), out=str(tmp_path / "tiny.safetensors"), pool=16, vae_steps=3, vae_batch=2,
        vae_crop=16, unet_steps=3, unet_batch=4, warmup=1, save_every=2, vae_minutes=5, unet_minutes=5,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_a_few_steps_reduce_the_loss(tmp_path):
    tr = Trainer(_cfg(tmp_path), progress=False)

    def fixed(fn):
        with torch.no_grad():
            return float(fn(torch.Generator().manual_seed(123)))

    before = fixed(tr.vae_loss)
    for s in range(8):
        tr.vae_step(torch.Generator().manual_seed(s))
    assert fixed(tr.vae_loss) < before
    tr.model.vae.eval()
    before = fixed(tr.unet_loss)
    for s in range(8):
        tr.unet_step(torch.Generator().manual_seed(s))
        tr.step += 1
    assert fixed(tr.unet_loss) < before


def test_fold_scale_is_exact():
    """Folding the latent scale into quant_conv / post_quant_conv scales the posterior and keeps decode(encode)."""
    from stable_diffusion.config import TINY
    from stable_diffusion.model import LatentDiffusion

    vae = LatentDiffusion(TINY).vae.eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        m0, s0 = vae.encode(x)
        d0 = vae.decode(m0)
        fold_scale(vae, 3.0)
        m1, s1 = vae.encode(x)
        d1 = vae.decode(m1)
    torch.testing.assert_close(m1, 3 * m0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s1, 3 * s0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d1, d0, rtol=1e-4, atol=1e-4)


def test_run_writes_a_loadable_fp16_checkpoint_and_resumes(tmp_path):
    tc = _cfg(tmp_path)
    out = Trainer(tc, progress=False).run()
    assert read_state_dict(out)["model.diffusion_model.out.2.weight"].dtype == torch.float16
    model = load_model(out)  # upcast to float32 by the loader
    assert model.cfg.name == "tiny" and next(model.parameters()).dtype == torch.float32
    from stable_diffusion.pipeline import StableDiffusion

    gen = StableDiffusion(model)("one small red circle on a white background, center", steps=2, sampler="ddim",
                                 guidance=3.0, progress=False)  # fmt: skip
    assert gen.pixels.shape == (1, 3, 64, 64) and torch.isfinite(gen.pixels).all()

    first = Trainer(tc, progress=False)
    first.load_state()
    assert (first.stage, first.step) == ("done", 3)
    saved_unet = {k: v.clone() for k, v in first.model.unet.state_dict().items()}

    more = _cfg(tmp_path, unet_steps=5)
    tr = Trainer(more, progress=False)
    tr.load_state()
    for k, v in tr.model.unet.state_dict().items():
        assert torch.equal(v, saved_unet[k])  # resumed weights are the saved ones
    tr2 = Trainer(more, progress=False)
    tr2.run(resume=True)
    assert (tr2.stage, tr2.step) == ("done", 5)
    assert len(tr2.history["unet"]) == 5 and len(tr2.history["vae"]) == 3  # VAE not retrained


def test_cli_flags_and_reproduce_command(tmp_path):
    tc, resume, progress = parse_args(["--unet-steps", "7", "--no-fp16", "--resume", "--work-dir", str(tmp_path)])
    assert tc.unet_steps == 7 and tc.fp16 is False and resume and progress
    cmd = tc.command()
    assert "--unet-steps 7" in cmd and "--no-fp16" in cmd and "--resume" not in cmd
    assert parse_args(cmd.split()[3:])[0] == tc


def test_warm_start_continues_the_unet_and_keeps_the_vae(tmp_path):
    """`--init FILE` loads every weight, skips the VAE stage and trains only the UNet + text encoder."""
    first = Trainer(_cfg(tmp_path / "a"), progress=False).run()
    src = load_model(first)
    tr = Trainer(_cfg(tmp_path / "b", init=str(first), unet_steps=2, lr_schedule="cosine"), progress=False)
    assert tr.stage == "unet"
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    out = tr.run()
    assert tr.history["vae"] == [] and len(tr.history["unet"]) == 2
    again = load_model(out)
    for k, v in again.vae.state_dict().items():
        assert torch.equal(v, src.vae.state_dict()[k]), k  # frozen VAE (fp16 -> fp16 round trip is exact)
    assert any(not torch.equal(v, src.unet.state_dict()[k]) for k, v in again.unet.state_dict().items())


def test_cosine_schedule_and_bad_flags(tmp_path):
    import pytest

    from stable_diffusion.errors import InputError
    from stable_diffusion.train import lr_at

    assert lr_at(0, 1.0, 10) == 0.1 and lr_at(500, 1.0, 10) == 1.0  # warmup, then constant
    assert lr_at(10, 1.0, 10, "cosine", 110, 0.1) == 1.0
    assert abs(lr_at(60, 1.0, 10, "cosine", 110, 0.1) - 0.55) < 1e-9  # halfway: mean of 1 and 0.1
    assert abs(lr_at(110, 1.0, 10, "cosine", 110, 0.1) - 0.1) < 1e-9
    with pytest.raises(InputError, match="no such file"):
        Trainer(_cfg(tmp_path, init=str(tmp_path / "missing.safetensors")), progress=False)
    with pytest.raises(InputError, match="lr-schedule"):
        Trainer(_cfg(tmp_path, lr_schedule="linear"), progress=False)


def test_cli_bad_init_is_one_line_and_exit_2(tmp_path, capsys):
    from stable_diffusion.train import main

    assert main(["--init", str(tmp_path / "missing.safetensors"), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --init") and "no such file" in err and "Traceback" not in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    assert main(["--init", str(junk), "--work-dir", str(tmp_path / "w")]) == 2  # a CheckpointError: no traceback
    assert capsys.readouterr().err.startswith("error: cannot load checkpoint")
