"""FLTrust (Cao, Fang, Liu & Gong, NDSS 2021): the server trusts an update as far as it points the server's way.

The server holds a small clean root set and trains its own step g_0 on it each round, from the
global weights w, with the clients' local training (:func:`~dipsen.federated.client.client_update`
and their :class:`~dipsen.federated.client.LocalTraining`). With the clients' steps g_i = w_i - w:

    TS_i = ReLU(cos(g_i, g_0)),   g = sum_i TS_i (||g_0|| / ||g_i||) g_i / sum_i TS_i,   w <- w + g.

An update at 90 degrees or more from g_0 gets no weight, and each is rescaled to ||g_0||, so no
update's size counts, only its direction. When every TS_i is 0 (or g_0 = 0) the global weights
stay, as BackFed does (FLPoison averages uniformly instead; the paper's choice is unverified).

Root set (:func:`root_rows`): ``fltrust_root_size`` rows (default 100, the paper's and FLPoison's
size) of the validation slice, a seeded choice: held out of the training rows before they are
partitioned, so they are no client's data and not the test set (an ``fltrust`` run holds the
slice out, see :attr:`~dipsen.config.TrainConfig.holds_out_validation`). The validation accuracy
is measured on the whole slice, the root rows included. The server trains at the round's rate,
as its clients do (the engine binds the round's :class:`~dipsen.federated.client.LocalTraining`
into ``server_update`` each round, so a learning-rate schedule applies to g_0 too). Sample counts
are ignored.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .base import FLTRUST, Admitted, Aggregation, Updates, flatten, generator

log = logging.getLogger(__name__)


def root_rows(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FLTrust's root set: ``size`` of the validation rows (x, y), a seeded choice (all of them if fewer)."""
    if size > len(y):
        log.warning("fltrust: the validation slice has only %d rows, the root set's size is %d: it takes them all", len(y), size)
    keep = np.sort(np.random.default_rng(seed).choice(len(y), size=min(size, len(y)), replace=False))
    return torch.from_numpy(x[keep]), torch.from_numpy(y[keep])


def fltrust(updates: Updates, spec: Aggregation, seed: int | None) -> Admitted:
    """w + the trust-weighted mean of the steps rescaled to the server step's norm (see the module); admitted: TS_i > 0."""
    if spec.server_update is None:
        raise ValueError("fltrust needs the server's own update (Aggregation.server_update)")
    server_seed = int(generator(seed, FLTRUST).integers(2**32))
    server = flatten(spec.server_update(updates.global_state, server_seed), updates.global_state) - updates.origin
    steps = updates.steps
    norms, server_norm = np.linalg.norm(steps, axis=1), float(np.linalg.norm(server))
    if server_norm == 0:
        return Admitted(updates.origin, [])
    # cos = 0 for a zero step (its dot product is 0 too)
    trust = np.maximum(steps @ server / (np.where(norms > 0, norms, 1.0) * server_norm), 0.0)
    admitted = np.flatnonzero(trust > 0).tolist()
    if not admitted:
        return Admitted(updates.origin, [])
    scale = np.divide(trust * server_norm, norms, out=np.zeros_like(norms), where=trust > 0)
    return Admitted(updates.origin + scale @ steps / trust.sum(), admitted)
