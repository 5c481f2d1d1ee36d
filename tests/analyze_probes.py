"""The analysis' probes as the tests watch them (shared by test_analyze_dit.py and test_analyze_families.py): one
call's recorded pairs and functions, the check that the pairs are those ``tofu_sd.apply`` merges, and the stand-in
modules of known linearity. A plain module (no tests)."""

import copy

import torch
from test_dit_common import capturing_matchings, recording

import tofu_sd
from evaluation.analyze import AnalyzeConfig, matched_pairs
from evaluation.analyze.dit import DiTRecorder
from tofu_sd import TokenFusionConfig
from tofu_sd.families import family_of


def take(x, pos):
    """The tokens of ``x`` (B, N, C) at positions ``pos`` (B, K)."""
    return x.gather(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def probe_call(model, inputs, max_pairs=1000):
    """One call of ``model`` under the analysis' hooks: per block, its pairs and what each function recorded,
    ``(function, f, z)``; the FL recording itself is left out."""
    arch = family_of(model)
    sites = arch.sites(model)
    config = AnalyzeConfig(out="unused", model="tiny-random", classes=[0], steps=1, max_pairs=max_pairs)
    recorder = DiTRecorder(model, arch, sites, config, TokenFusionConfig(), 1000)
    calls = {site.name: [] for site in sites}
    for probe in recorder.probes:
        probe._record = lambda function, f, z, probe=probe: calls[probe.site.name].append((function, f, z, probe.pairs))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        recorder.close()
    return calls, recorder


def check_pairs_of_apply(model, inputs):
    """Check that each block's probe pairs are those ``tofu_sd.apply`` (default options) merges in the same call,
    most similar first, each block of the patched model given the input it has in the unpatched one, as the
    analysis sees it. Returns :func:`probe_call`'s calls."""
    calls, _ = probe_call(model, inputs)
    blocks = {name: model.get_submodule(name) for name in calls}
    with recording(blocks) as given, torch.no_grad():
        model(**inputs)
    patched = tofu_sd.apply(copy.deepcopy(model))
    handles = []
    for name in calls:
        ((args, kwargs),) = given[name]  # one call of each block
        unpatched = lambda module, a, k, args=args, kwargs=kwargs: (args, kwargs)
        handles.append(patched.get_submodule(name).register_forward_pre_hook(unpatched, with_kwargs=True))
    try:
        with capturing_matchings(patched) as used, torch.no_grad():
            patched(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    for name, recorded in calls.items():
        src, dst = matched_pairs(used[name][0])
        assert recorded and all(torch.equal(p[0], src) and torch.equal(p[1], dst) for *_, p in recorded), name
    return calls


class Sine(torch.nn.Module):
    """``sin(1e4 x)``: far from linear (FL well below 1)."""

    def forward(self, x, *args, **kwargs):
        return torch.sin(1e4 * x)


class Zero(torch.nn.Module):
    """Zeros of ``x``'s shape: as a query norm, uniform attention over fixed keys, a constant (FL 1)."""

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)
