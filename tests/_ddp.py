"""Two torchrun-style processes on one machine (gloo), shared by the removal DDP tests."""

import multiprocessing as mp
import os
import socket

import torch

from conftest import make_model
from lnfree.removal import remove_layernorm


def _rank(rank, port, out_dir, data, kw):
    """One torchrun-style process: the env variables torchrun sets, then the same call as a single process."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        m = remove_layernorm(make_model(), data, out_dir=out_dir, **kw)
        torch.save(m.state_dict(), out_dir / f"rank{rank}.pt")
        os._exit(0)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)


def run_two_ranks(out_dir, data, kw) -> tuple[dict, dict]:
    """Run `remove_layernorm(make_model(), data, **kw)` as 2 DDP processes; return both ranks' state dicts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, port, out_dir, data, kw)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    return (torch.load(out_dir / "rank0.pt", weights_only=True), torch.load(out_dir / "rank1.pt", weights_only=True))
