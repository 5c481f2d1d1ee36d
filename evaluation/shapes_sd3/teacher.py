"""The ``--model tiny`` U-Net as a teacher for the SD3-style model: its denoiser's estimate of the flow target.

A rectified-flow sample ``x_t = (1 - s) x_0 + s n`` is a DDPM sample ``sqrt(a) x_0 + sqrt(1 - a) n`` scaled by
``r = sqrt((1 - s)^2 + s^2)``, with ``a = (1 - s)^2 / r^2``; both models use the same VAE latents
(``scaling_factor`` 0.726, shift 0), so the U-Net, asked at the continuous timestep whose ``alphas_cumprod`` is
``a``, predicts the noise ``eps`` of ``x_t / r``, and the flow target ``n - x_0`` it implies is
``(eps - x_t) / (1 - s)``. That estimate of the target's conditional mean has far less variance than the drawn
``n - x_0`` the data loss regresses on, which is what makes the small transformer learn its shapes faster.
Where ``a`` lies outside the U-Net's training table (``s`` above about 0.93), :meth:`UNetTeacher.target` keeps
the data target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def alphas_cumprod(folder: Path) -> np.ndarray:
    """The ``alphas_cumprod`` table of the model in ``folder``, as its own scheduler config makes it (the ``tiny``
    model: Stable Diffusion's scaled-linear betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(Path(folder) / "scheduler").alphas_cumprod.double().numpy()


def ddpm_match(sigma: torch.Tensor, table: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For flow noise levels ``sigma``: the input scale ``1 / r``, the continuous DDPM timestep with the same
    signal-to-noise ratio (linear in log-SNR between the table's entries), and whether it lies inside the table."""
    s = sigma.double()
    log_snr = 2 * (torch.log1p(-s) - torch.log(s))
    table_snr = np.log(table / (1 - table))  # decreasing with the timestep
    t = np.interp(log_snr.numpy(), table_snr[::-1], np.arange(len(table))[::-1].astype(np.float64))
    tol = 1e-9  # the table's own end points, computed through sigma, land a rounding error outside it
    inside = (log_snr <= float(table_snr[0]) + tol) & (log_snr >= float(table_snr[-1]) - tol)
    scale = 1 / torch.sqrt((1 - s) ** 2 + s**2)
    return scale.float(), torch.from_numpy(t).float(), inside


class UNetTeacher:
    """The shipped U-Net model's denoiser (its U-Net and text encoder, frozen) as a source of flow targets."""

    def __init__(self, folder: Path) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        folder = Path(folder)
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").float().eval().requires_grad_(False)
        self.text = CLIPTextModel.from_pretrained(folder / "text_encoder").float().eval().requires_grad_(False)
        self.table = alphas_cumprod(folder)

    @torch.no_grad()
    def target(self, xt: torch.Tensor, sigma: torch.Tensor, ids: torch.Tensor, data_target: torch.Tensor) -> torch.Tensor:
        """The teacher's ``n - x_0`` for ``x_t`` at ``sigma`` (per sample) with captions ``ids``; the data target
        where the noise level is outside the teacher's table."""
        scale, t, inside = ddpm_match(sigma, self.table)
        states = self.text(ids).last_hidden_state  # what StableDiffusionPipeline passes the U-Net
        eps = self.unet(xt * scale.view(-1, 1, 1, 1), t, encoder_hidden_states=states).sample
        s = sigma.view(-1, 1, 1, 1)
        teacher = (eps - xt) / (1 - s)
        return torch.where(inside.view(-1, 1, 1, 1), teacher, data_target)
