"""val_loss under several processes equals one process's: every process evaluates its share of one
evaluation stream (two CPU processes over gloo, as torchrun would start them)."""

import os
import socket

import torch
import torch.multiprocessing as mp
from conftest import tiny_config

from model import GPT
from nanoforge.data import Dataset
from nanoforge.distributed import Distributed
from nanoforge.training import estimate_loss


def losses(cfg, out, ddp):
    torch.manual_seed(0)
    data = Dataset(cfg.data_dir, cfg.block_size)
    model = GPT(cfg.model_config(data.vocab_size))
    out.update(estimate_loss(model, data, cfg, torch.autocast("cpu", enabled=False), torch.device("cpu"), ddp))


def process(rank, cfg, port, results):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ddp = Distributed()
    ddp.start(torch.device("cpu"))
    try:
        out = {}
        losses(cfg, out, ddp)
        results[rank] = out
    finally:
        ddp.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_report_the_loss_one_process_does(tmp_path, data_dir):
    for eval_iters in (3,):  # 3 over 2 processes: the second process's last batch counts for nothing
        cfg = tiny_config(data_dir, tmp_path / "run", eval_iters=eval_iters)
        one = {}
        losses(cfg, one, Distributed())
        # by hand: the mean loss of the first eval_iters batches of the seed + 1 stream, in one process
        torch.manual_seed(0)
        data = Dataset(cfg.data_dir, cfg.block_size)
        model = GPT(cfg.model_config(data.vocab_size)).eval()
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        by_hand = sum(model(*data.get_batch("val", cfg.batch_size, generator))[1].item()
                      for _ in range(eval_iters)) / eval_iters
        assert abs(one["val"] - by_hand) < 1e-6
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(process, args=(cfg, free_port(), results), nprocs=2)
            both = dict(results)
        for rank in (0, 1):
            assert abs(both[rank]["val"] - one["val"]) < 1e-6 and abs(both[rank]["train"] - one["train"]) < 1e-6
