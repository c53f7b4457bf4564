"""One rank of the tensor-parallel tests (started by torch.multiprocessing.spawn from
test_tensor_parallel.py): loads each case's checkpoint with zoo.load(path, tp=world), runs the
calls the test compares with tp=1, and saves what it got (or the error it met) to
out_dir/<case>.<rank>.pt."""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import time
import traceback

import torch

# one case on one rank, autotuning its kernels on a GPU included
CASE_TIMEOUT_S = float(os.environ.get("ZOO_TP_CASE_TIMEOUT_S", 600))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rank: int, world: int, port: int, cases: list[dict], out_dir: str, device: str) -> None:
    """torchrun's variables, then every case on this rank."""
    if sys.platform == "linux":  # gloo over the loopback: the ranks share this host
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch.distributed as dist

    import zoo

    try:
        for case in cases:
            # a case stuck (a collective one rank never joins, say) prints every thread's stack
            # and ends the process: the spawn then fails instead of hanging the test session
            faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
            print(f"rank {rank}: case {case['name']}...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            result = run_case(zoo, case, world, device)
            torch.save(result, os.path.join(out_dir, f"{case['name']}.{rank}.pt"))
            print(
                f"rank {rank}: case {case['name']}: {outcome(result)} "
                f"({time.perf_counter() - start:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        faulthandler.cancel_dump_traceback_later()
    finally:
        if dist.is_initialized():
            from zoo.parallel import destroy_group

            destroy_group()
    # Every result is on disk: leave without the interpreter's teardown. gloo's background threads
    # can abort a process there ("terminate called without an active exception": seen once, on
    # both ranks, in a full CPU suite run); an abort before this point still fails the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def outcome(result: dict) -> str:
    """One line on a case's result: its error's or crash's last line, else done."""
    for kind in ("crash", "error"):
        if kind in result:
            return f"{kind}: {result[kind].strip().splitlines()[-1]}"
    return "done"


def run_case(zoo, case: dict, world: int, device: str) -> dict:
    if "argv" in case:
        return run_cli(case["argv"])
    dtype = getattr(torch, case.get("dtype", "float32"))
    try:
        model = zoo.load(case["path"], tp=world, device=device, dtype=dtype)
    except ValueError as e:
        return {"error": str(e)}
    except Exception:
        return {"crash": traceback.format_exc()}
    # on the GPU zoo.load turns the symmetric-memory all-reduce on: first NCCL alone
    result = {"symmetric_default": model.tp.symmetric_memory}
    model.tp.disable_symmetric_memory()
    ids = case["ids"].to(model.device)
    mask = case["mask"].to(model.device)
    new = case["max_new_tokens"]
    result["logits"] = model(ids, attention_mask=mask, cuda_graph=False).cpu()
    result["greedy"] = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], cuda_graph=False
    ).cpu()
    # no seed given: each rank draws its own, the model makes them agree
    result["sampled"] = model.generate(
        ids, max_new_tokens=2, do_sample=True, top_k=20, eos_token_id=[], cuda_graph=False
    ).cpu()
    if model.device.type == "cuda":  # graphs: plain call and decode replayed
        result["graph_logits"] = model(ids, attention_mask=mask).cpu()
        result["graph_greedy"] = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[]
        ).cpu()
        result["graph_sampled"] = model.generate(
            ids, max_new_tokens=new, do_sample=True, top_k=20, eos_token_id=[], seed=3
        ).cpu()
    # the one-shot all-reduce over symmetric memory (GPUs only), graphs captured afresh
    result["symmetric_on"] = model.tp.enable_symmetric_memory(dtype)
    if result["symmetric_on"]:
        model.engine.reset()
        result["symmetric_logits"] = model(ids, attention_mask=mask).cpu()
        result["symmetric_greedy"] = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[]
        ).cpu()
    return result


def run_cli(argv: list[str]) -> dict:
    """The zoo command on this rank: its exit status and what it printed."""
    import contextlib
    import io

    from zoo.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    except Exception:  # reported by the test like any case's crash, the spawn still completes
        return {"crash": traceback.format_exc() + err.getvalue()}
    return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}
