"""The U-Net teacher's flow targets (evaluation.shapes_sd3.teacher) against the DDPM and flow formulas."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluation.shapes import MODEL_DIR
from evaluation.shapes_sd3.teacher import UNetTeacher, alphas_cumprod, ddpm_match

TABLE = alphas_cumprod(MODEL_DIR)


def test_schedule_is_stable_diffusions_scaled_linear():
    table = TABLE
    betas = 1 - table[1:] / table[:-1]
    assert table.shape == (1000,)
    # the folder's scheduler computes its table in float32: close to, not equal to, the float64 formula
    assert betas[0] == pytest.approx((np.sqrt(0.00085) + (np.sqrt(0.012) - np.sqrt(0.00085)) / 999) ** 2, rel=1e-4)
    assert 1 - table[0] == pytest.approx(0.00085, rel=1e-4)


@pytest.mark.parametrize("t", [0, 1, 250, 500, 998, 999])
def test_flow_sample_is_a_scaled_ddpm_sample_at_the_matching_timestep(t):
    table = TABLE
    a = table[t]
    sigma = np.sqrt(1 - a) / (np.sqrt(a) + np.sqrt(1 - a))  # SNR (1-s)^2/s^2 = a/(1-a)
    scale, timestep, inside = ddpm_match(torch.tensor([sigma]), table)
    assert bool(inside[0])
    assert float(timestep[0]) == pytest.approx(t, abs=1e-3)
    x0, noise = torch.randn(2, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
    flow = (1 - sigma) * x0 + sigma * noise
    ddpm = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    torch.testing.assert_close(flow * float(scale[0]), ddpm, rtol=1e-6, atol=1e-6)


def _oracle_teacher(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> UNetTeacher:
    """A teacher whose U-Net returns the true noise of its DDPM input (the ideal denoiser on these samples)."""
    teacher = UNetTeacher.__new__(UNetTeacher)
    teacher.table = TABLE

    def unet(x_in, t, encoder_hidden_states):
        a = torch.from_numpy(np.interp(t.double().numpy(), np.arange(1000), teacher.table)).float().view(-1, 1, 1, 1)
        ddpm = a.sqrt() * x0 + (1 - a).sqrt() * noise
        torch.testing.assert_close(x_in[:-1], ddpm[:-1], rtol=0, atol=2e-3)  # the last is outside the table; the
        # teacher interpolates in log-SNR, this reference in alphas_cumprod: they differ off the integer steps
        return SimpleNamespace(sample=noise)

    teacher.unet = unet
    teacher.text = lambda ids: SimpleNamespace(last_hidden_state=torch.zeros(ids.shape[0], ids.shape[1], 8))
    return teacher


def test_ideal_denoiser_gives_the_flow_target_and_out_of_table_noise_keeps_the_data_target():
    torch.manual_seed(0)
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.9, 0.999])
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    data = torch.full_like(x0, 7.0)  # a marker: only the out-of-table sample may take it
    out = _oracle_teacher(x0, noise, sigma).target(xt, sigma, torch.zeros(6, 16, dtype=torch.long), data)
    torch.testing.assert_close(out[:5], (noise - x0)[:5], rtol=1e-3, atol=1e-3)
    assert torch.equal(out[5], data[5])  # 0.999: SNR below the table's last entry
