"""Classifier-free guidance against closed forms: with class-conditional Gaussian data and the exact
conditional and unconditional denoisers, guidance w = 1 must sample the class's Gaussian and w = 0
the mixture, with any sampler; and the guided prediction is the stated combination."""
import pytest
import torch

from difflab.conditioning import drop, null_condition, take
from difflab.denoiser import Denoiser
from difflab.errors import ConfigError
from difflab.samplers import SamplerConfig, sample
from difflab.schedule import NoiseSchedule

from gaussian import GaussianClassModel

MUS = torch.tensor([[-0.6, 0.2, 0.5], [0.1, -0.5, 0.0], [0.7, 0.4, -0.6]], dtype=torch.float64)  # 3 classes, 3 dims
S = 0.15


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_name("linear", 1000)


def denoiser(schedule, w, interval=None):
    return Denoiser(GaussianClassModel(schedule, MUS, S), schedule, "eps", guidance=w, guidance_interval=interval)


def draw(den, cfg, n, labels):
    return sample(den, n, (3,), cfg, seed=0, batch_size=n, progress=False, labels=labels).double()


@pytest.mark.parametrize("cfg", [SamplerConfig(sampler="heun", steps=20), SamplerConfig(sampler="dpmpp-2m", steps=30),
                                 SamplerConfig(sampler="dpmpp-2m-sde", steps=40)], ids=lambda c: c.sampler.value)
def test_guidance_one_is_the_class_and_zero_the_mixture(schedule, cfg):
    n = 2000
    for c in range(3):
        x = draw(denoiser(schedule, 1.0), cfg, n, torch.full((n, 1), c))
        assert torch.allclose(x.mean(0), MUS[c], atol=0.012), (c, x.mean(0))
        assert torch.allclose(x.std(0), torch.full((3,), S, dtype=torch.float64), rtol=0.08), (c, x.std(0))
    mix = draw(denoiser(schedule, 0.0), cfg, n, torch.full((n, 1), 1))  # the label is ignored at w = 0
    assert torch.allclose(mix.mean(0), MUS.mean(0), atol=0.03)
    assert torch.allclose(mix.var(0), S**2 + MUS.var(0, unbiased=False), rtol=0.1)


def test_guidance_sharpens_towards_the_class(schedule):
    """w > 1 pushes samples past the class mean, away from the others (the trade-off CFG makes)."""
    cfg, n = SamplerConfig(sampler="dpmpp-2m", steps=30), 2000
    one, three = (draw(denoiser(schedule, w), cfg, n, torch.full((n, 1), 0)) for w in (1.0, 3.0))
    assert float(three.std(0).mean()) < float(one.std(0).mean())


def test_the_guided_prediction_is_the_stated_combination(schedule):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([[0], [1], [2], [-1]])
    cond, uncond = (Denoiser(GaussianClassModel(schedule, MUS, S), schedule).predict(x, 400.0, labels=lab)
                    for lab in (labels, torch.full_like(labels, -1)))
    guided = denoiser(schedule, 2.5).predict(x, 400.0, labels=labels)
    torch.testing.assert_close(guided.x0, uncond.x0 + 2.5 * (cond.x0 - uncond.x0))
    torch.testing.assert_close(guided.eps, uncond.eps + 2.5 * (cond.eps - uncond.eps))
    torch.testing.assert_close(guided.x0[3], cond.x0[3])  # no label: guidance changes nothing
    sigma = float(schedule.sigma_at(400.0))
    outside = denoiser(schedule, 2.5, interval=(sigma * 2, sigma * 4)).predict(x, 400.0, labels=labels)
    torch.testing.assert_close(outside.x0, cond.x0)  # outside the interval: the conditional model
    inside = denoiser(schedule, 2.5, interval=(sigma / 2, sigma * 2)).predict(x, 400.0, labels=labels)
    torch.testing.assert_close(inside.x0, guided.x0)
    with pytest.raises(ConfigError, match="--guidance"):
        denoiser(schedule, -1.0)


def test_guidance_zero_is_one_pass_on_the_null_condition(schedule):
    """w = 0 needs no conditional half: the network sees the batch once, without labels, and the
    result is the unconditional prediction."""
    model = GaussianClassModel(schedule, MUS, S)
    seen = []
    model.register_forward_hook(lambda _m, args, kw, _o: seen.append((args[0].shape[0], kw["labels"].clone())), with_kwargs=True)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([[0], [1], [2], [1]])
    zero = Denoiser(model, schedule, "eps", guidance=0.0).predict(x, 300.0, labels=labels)
    assert len(seen) == 1 and seen[0][0] == 4 and bool((seen[0][1] == -1).all())
    uncond = Denoiser(model, schedule, "eps").predict(x, 300.0, labels=torch.full_like(labels, -1))
    torch.testing.assert_close(zero.x0, uncond.x0)
    seen.clear()
    Denoiser(model, schedule, "eps", guidance=2.0).predict(x, 300.0, labels=labels)
    assert [b for b, _ in seen] == [8]  # any other weight: one call on the doubled batch


def test_guided_images_do_not_depend_on_the_batch(schedule):
    den, cfg = denoiser(schedule, 3.0), SamplerConfig(sampler="dpmpp-2m-sde", steps=10)
    labels = torch.tensor([[0], [1], [2], [0], [1]])
    a = sample(den, 5, (3,), cfg, seed=3, batch_size=5, progress=False, labels=labels)
    b = sample(den, 5, (3,), cfg, seed=3, batch_size=2, progress=False, labels=labels)
    torch.testing.assert_close(a, b)
    shard = sample(den, 3, (3,), cfg, seed=3, batch_size=2, start=2, progress=False, labels=labels[2:])
    torch.testing.assert_close(shard, a[2:])


def test_condition_helpers():
    cond = {"labels": torch.tensor([[0, 3], [1, 2]]), "text": torch.ones(2, 4), "text_mask": torch.ones(2, 5, dtype=torch.bool)}
    null = null_condition(cond)
    assert bool((null["labels"] == -1).all()) and not null["text"].any() and not null["text_mask"].any()
    assert take({"labels": torch.tensor([[7]])}, slice(0, 3), 5)["labels"].shape == (3, 1)
    assert torch.equal(take(cond, slice(1, 2), 2)["labels"], torch.tensor([[1, 2]]))
    g = torch.Generator().manual_seed(0)
    big = {"labels": torch.zeros(20000, 2, dtype=torch.long), "text": torch.ones(20000, 4)}
    dropped = drop(big, 0.1, g)
    whole = (dropped["text"] == 0).all(1)
    assert abs(float(whole.float().mean()) - 0.1) < 0.01  # the whole condition, p = 0.1
    assert bool((dropped["labels"][whole] == -1).all())
    single = (dropped["labels"] == -1)[~whole].float().mean(0)  # and each attribute on its own
    assert torch.allclose(single, torch.full((2,), 0.1), atol=0.01)
    assert drop(big, 0.0, g) is big
