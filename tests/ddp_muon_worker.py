"""One rank of the DDP Muon test: a few training steps of a tiny model, then rank 0 saves params and optimizer state.

Run under `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m tests.ddp_muon_worker OUT STEPS`
(the rendezvous every 2-process training test uses), or with plain `python -m` for the one-process reference.
"""

import faulthandler
import os
import socket
import sys

import torch
import torch.distributed as dist

from nanochat_hf import NanoChatForCausalLM
from nanochat_hf.training.optim import MuonAdamW, NanoChatSchedule, nanochat_param_groups
from nanochat_hf.training.pretrain import keep_local_gloo_on_loopback

from .conftest import randomize, tiny_config

# A rank stuck anywhere (rendezvous, a collective, interpreter exit) prints its stack and exits instead of hanging
# the test suite; gloo's own timeout does not cover every wait.
faulthandler.dump_traceback_later(240, exit=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out_file: str, steps: int) -> None:
    if "RANK" not in os.environ:  # the one-process reference: a group of one over the same kind of TCP store
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    keep_local_gloo_on_loopback()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # float64: AdamW divides by sqrt(v), which turns fp32 rounding of near-zero gradient entries (summed in a
    # different order by DDP) into visible differences; in fp64 any real divergence still shows.
    model = randomize(NanoChatForCausalLM(tiny_config("2026")), seed=0).double().train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = MuonAdamW(nanochat_param_groups(model))
    sched = NanoChatSchedule(opt, total_steps=steps, warmup_steps=2)
    gen = torch.Generator().manual_seed(123)
    for _ in range(steps):
        ids = torch.randint(0, 300, (4, 16), generator=gen)
        shard = ids[rank * 4 // world : (rank + 1) * 4 // world]
        ddp(shard, labels=shard).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save({"params": model.state_dict(), "optim": opt.state_dict()}, out_file)
    # DDP's reducer must go while its process group still exists: freed after destroy_process_group (as locals
    # are when this function returns), it can block its rank forever.
    del ddp
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
