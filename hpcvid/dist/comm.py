"""How a rank talks to its peers: `Comm` hides whether mpi4py, torch.distributed or a single process carries the
messages; `make_comm` picks one for an `Env`; ranks start together and fail together.
"""
from __future__ import annotations

import abc
import os
import pickle
import socket
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

from hpcvid.dist.env import Env

BACKENDS = ("auto", "mpi", "torch", "local")
OPS = ("sum", "max", "min")


def _torch():
    import torch

    return torch


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # no tensor can exist before torch is imported
    return torch is not None and isinstance(x, torch.Tensor)


class Comm(abc.ABC):
    """Messages between the ranks of one launched group. Objects must pickle; send/recv block, so order them."""

    rank: int = 0
    world_size: int = 1
    device: str | Any = "cpu"  # where tensors must sit for _send_bytes/_recv_bytes/_reduce_tensor

    @abc.abstractmethod
    def barrier(self) -> None: ...
    @abc.abstractmethod
    def broadcast(self, obj: Any, root: int = 0) -> Any: ...
    @abc.abstractmethod
    def all_gather(self, obj: Any) -> list: ...
    @abc.abstractmethod
    def send(self, obj: Any, dest: int, tag: int = 0) -> None: ...
    @abc.abstractmethod
    def recv(self, source: int, tag: int = 0) -> Any: ...
    @abc.abstractmethod
    def _send_bytes(self, t, dest: int, tag: int) -> None: ...
    @abc.abstractmethod
    def _recv_bytes(self, buf, source: int, tag: int) -> None: ...
    @abc.abstractmethod
    def _reduce_array(self, a: np.ndarray, op: str) -> np.ndarray: ...
    @abc.abstractmethod
    def _reduce_tensor(self, t, op: str) -> None: ...

    def close(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        """End every rank now: a rank that failed alone would otherwise leave the others waiting forever."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def all_reduce(self, x: Any, op: str = "sum") -> Any:
        """Numbers give numbers, numpy arrays give new arrays, tensors are reduced in place and returned."""
        if op not in OPS:
            raise ValueError(f"all_reduce op {op!r} is not one of {OPS}")
        if _is_tensor(x):
            self._reduce_tensor(x, op)
            return x
        if isinstance(x, (np.ndarray, np.generic)):
            a = np.array(x, order="C")  # half precision has no MPI type: reduce in float32
            out = self._reduce_array(a.astype(np.float32) if a.dtype == np.float16 else a, op).astype(a.dtype)
            return out if isinstance(x, np.ndarray) else out[()]
        if isinstance(x, (int, float)):
            out = self._reduce_array(np.array([x], np.float64 if isinstance(x, float) else np.int64), op)
            return float(out[0]) if isinstance(x, float) else int(out[0])
        raise TypeError(f"all_reduce takes a number, numpy array or torch tensor, not {type(x).__name__}")

    def send_tensor(self, t, dest: int, tag: int = 0) -> None:
        """Send shape and dtype first, so that a mismatched receiver fails with a message and not a hang."""
        self.send((tuple(t.shape), str(t.dtype)), dest, tag)
        self._send_bytes(t.detach().contiguous().reshape(-1).view(_torch().uint8).to(self.device), dest, tag)

    def recv_tensor(self, out, source: int, tag: int = 0):
        """Fill `out` (any device, any layout) in place with the tensor sent from `source`; returns `out`."""
        torch = _torch()
        shape, dtype = self.recv(source, tag)
        ok = shape == tuple(out.shape) and dtype == str(out.dtype)
        if ok and out.is_contiguous() and out.device == torch.device(self.device) and out.numel():
            self._recv_bytes(out.view(-1).view(torch.uint8), source, tag)
            return out
        nbytes = int(np.prod(shape)) * getattr(torch, dtype.split(".")[-1]).itemsize
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._recv_bytes(buf, source, tag)  # drain the message even when it does not fit
        if not ok:
            raise ValueError(f"recv_tensor from rank {source}: got {dtype} {shape}, out is {out.dtype} "
                             f"{tuple(out.shape)}")
        with torch.no_grad():
            out.copy_(buf.view(out.dtype).reshape(out.shape))
        return out

    # ---- the hot path of clip-parallel attention: shapes agreed in advance, no header message, no pickle; started
    # without waiting, so that a caller can compute while the bytes travel

    def start_exchange(self, t, peer: int, out, tag: int = 0) -> "Pending":
        """Send `t` to `peer` and receive into `out` what `peer` sends back; both sides call it, each knowing the
        shape and dtype of what it receives (sizes may differ by direction; a mismatch is the transport's error).
        This blocking fallback exchanges now (the lower rank sends first, so it cannot deadlock); transports with
        non-blocking calls override it. `.wait()` returns `out`."""
        send = _as_bytes(t, self.device)
        recv = _as_bytes(out, self.device) if _fits(out, self.device) else _byte_buffer(out, self.device)
        if self.rank < peer:
            self._send_bytes(send, peer, tag)
            self._recv_bytes(recv, peer, tag)
        else:
            self._recv_bytes(recv, peer, tag)
            self._send_bytes(send, peer, tag)
        return Pending(lambda: _fill(out, recv))

    def start_all_gather(self, t) -> "Pending":
        """Every rank's `t` (same shape and dtype everywhere); `.wait()` returns them stacked, (world, *t.shape)."""
        torch = _torch()
        parts = torch.stack(self.all_gather(t.detach().cpu())).to(t.device)
        return Pending(lambda: parts)


class Pending:
    """Communication in flight: `wait()` finishes it (once) and returns its result. `keep`: buffers the transport
    reads or writes until then (a non-blocking send must not see its buffer freed)."""

    def __init__(self, finish: Callable[[], Any], keep: tuple = ()):
        self._finish, self._keep, self._done, self._result = finish, keep, False, None

    def wait(self) -> Any:
        if not self._done:
            self._result, self._done, self._keep = self._finish(), True, ()
        return self._result


def _fits(t, device) -> bool:
    """Can a transport read and write `t`'s memory directly (contiguous, on its device)?"""
    torch = _torch()
    return t.is_contiguous() and t.device == torch.device(device)


def _as_bytes(t, device):
    """A flat uint8 view of `t` on `device` (a copy only when it is elsewhere or not contiguous)."""
    return t.detach().contiguous().to(device).reshape(-1).view(_torch().uint8)


def _byte_buffer(like, device):
    """A flat uint8 buffer on `device` the size of `like`."""
    return _torch().empty(like.numel() * like.element_size(), dtype=_torch().uint8, device=device)


def _fill(out, received):
    """Copy `received` (flat uint8) into `out` unless it already is out's memory; returns `out`."""
    if received.data_ptr() != out.data_ptr():
        with _torch().no_grad():
            out.copy_(received.view(out.dtype).reshape(out.shape))
    return out


class LocalComm(Comm):
    """The one-rank world: collectives return their input; there is nobody to send to."""

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        if root != 0:
            raise ValueError(f"broadcast root {root} does not exist in a 1-rank world")
        return obj

    def all_gather(self, obj: Any) -> list:
        return [obj]

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        raise RuntimeError(f"LocalComm has one rank: nobody to send to (dest={dest}); use a multi-rank launcher")

    def recv(self, source: int, tag: int = 0) -> Any:
        raise RuntimeError(f"LocalComm has one rank: nobody to receive from (source={source})")

    _send_bytes, _recv_bytes = send, recv

    def _reduce_array(self, a: np.ndarray, op: str) -> np.ndarray:
        return a.copy()

    def _reduce_tensor(self, t, op: str) -> None:
        pass


class MPIComm(Comm):
    """mpi4py over COMM_WORLD (or a given communicator): pickles for objects, raw buffers for arrays."""

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._in_place = MPI.IN_PLACE

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)
        os._exit(code)   # MPICH's Abort can return on the calling rank; never go on past it

    def barrier(self) -> None:
        # MPICH's Barrier spins a core while it waits; a rank that finished its shards early would steal that core
        # from the ranks still working beside it. Poll a non-blocking barrier and sleep instead (backing off to 50 ms).
        request, pause = self.comm.Ibarrier(), 0.0005
        while not request.Test():
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def all_gather(self, obj: Any) -> list:
        return self.comm.allgather(obj)

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        self.comm.send(obj, dest=dest, tag=tag)

    def recv(self, source: int, tag: int = 0) -> Any:
        return self.comm.recv(source=source, tag=tag)

    def _send_bytes(self, t, dest: int, tag: int) -> None:
        self.comm.Send(t.numpy(), dest=dest, tag=tag)  # numpy view, not DLPack: works for every dtype via uint8

    def _recv_bytes(self, buf, source: int, tag: int) -> None:
        self.comm.Recv(buf.numpy(), source=source, tag=tag)

    def _reduce_array(self, a: np.ndarray, op: str) -> np.ndarray:
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=self._ops[op])
        return out

    def _reduce_tensor(self, t, op: str) -> None:
        """Reduce in the tensor's own memory when MPI can (contiguous CPU, not half/bool), else via a host copy."""
        torch = _torch()
        if t.device.type == "cpu" and t.is_contiguous() and t.dtype not in (torch.float16, torch.bfloat16, torch.bool):
            self.comm.Allreduce(self._in_place, t.detach().numpy(), op=self._ops[op])
            return
        wide = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
        host = t.detach().to("cpu", wide).contiguous().numpy()
        self.comm.Allreduce(self._in_place, host, op=self._ops[op])
        with torch.no_grad():
            t.copy_(torch.from_numpy(host))


    def start_exchange(self, t, peer: int, out, tag: int = 0) -> Pending:
        """MPI Isendrecv: both directions at once, in flight until wait()."""
        send = _as_bytes(t, "cpu")
        recv = _as_bytes(out, "cpu") if _fits(out, "cpu") else _byte_buffer(out, "cpu")
        request = self.comm.Isendrecv(send.numpy(), dest=peer, sendtag=tag, recvbuf=recv.numpy(), source=peer,
                                      recvtag=tag)

        def finish():
            request.Wait()
            return _fill(out, recv)

        return Pending(finish, keep=(send, recv))

    def start_all_gather(self, t) -> Pending:
        """MPI Iallgather of raw bytes (any dtype, bfloat16 too)."""
        torch = _torch()
        send = _as_bytes(t, "cpu")
        recv = torch.empty((self.world_size, send.numel()), dtype=torch.uint8)
        request = self.comm.Iallgather(send.numpy(), recv.numpy())

        def finish():
            request.Wait()
            return recv.view(t.dtype).reshape(self.world_size, *t.shape).to(t.device)

        return Pending(finish, keep=(send, recv))


class TorchComm(Comm):
    """The initialised torch.distributed default group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, owns_group: bool = False):
        torch = _torch()
        dist = torch.distributed
        if not dist.is_initialized():
            raise RuntimeError("TorchComm needs an initialised torch.distributed (see init_torch_distributed)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self._dist, self._owns_group = dist, owns_group
        self._ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

    def barrier(self) -> None:
        self._dist.barrier()

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=root)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        out = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        """A pickle as two messages: its length, then its bytes (torch p2p moves only tensors of known size)."""
        torch = _torch()
        payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
        self._send_bytes(torch.tensor([payload.numel()], dtype=torch.int64), dest, tag)
        self._send_bytes(payload, dest, tag)

    def recv(self, source: int, tag: int = 0) -> Any:
        torch = _torch()
        size = torch.empty(1, dtype=torch.int64, device=self.device)
        self._recv_bytes(size, source, tag)
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self._recv_bytes(payload, source, tag)
        return pickle.loads(payload.cpu().numpy().tobytes())

    def start_exchange(self, t, peer: int, out, tag: int = 0) -> Pending:
        """A non-blocking send and receive posted together (NCCL needs both to be in flight at once)."""
        dist = self._dist
        send = t.detach().to(self.device).contiguous()
        recv = out if _fits(out, self.device) else _torch().empty(out.shape, dtype=out.dtype, device=self.device)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peer, tag=tag),
                                        dist.P2POp(dist.irecv, recv, peer, tag=tag)])

        def finish():
            for work in works:
                work.wait()
            if recv is not out:
                with _torch().no_grad():
                    out.copy_(recv)
            return out

        return Pending(finish, keep=(send, recv))

    def start_all_gather(self, t) -> Pending:
        torch = _torch()
        send = t.detach().to(self.device).contiguous().reshape(-1)
        recv = torch.empty((self.world_size * send.numel(),), dtype=t.dtype, device=self.device)   # gloo: flat
        work = self._dist.all_gather_into_tensor(recv, send, async_op=True)

        def finish():
            work.wait()
            return recv.view(self.world_size, *t.shape).to(t.device)

        return Pending(finish, keep=(send, recv))

    def _send_bytes(self, t, dest: int, tag: int) -> None:
        self._dist.send(t.to(self.device), dst=dest, tag=tag)

    def _recv_bytes(self, buf, source: int, tag: int) -> None:
        self._dist.recv(buf, src=source, tag=tag)

    def _reduce_array(self, a: np.ndarray, op: str) -> np.ndarray:
        t = _torch().from_numpy(a.copy()).to(self.device)
        self._dist.all_reduce(t, op=self._ops[op])
        return t.cpu().numpy()

    def _reduce_tensor(self, t, op: str) -> None:
        if t.device == self.device and t.is_contiguous():
            self._dist.all_reduce(t, op=self._ops[op])
            return
        tmp = t.detach().to(self.device).contiguous()
        self._dist.all_reduce(tmp, op=self._ops[op])
        with _torch().no_grad():
            t.copy_(tmp)

    def close(self) -> None:
        """Destroy the process group only if make_comm created it."""
        if self._owns_group:
            destroy_torch_distributed()
            self._owns_group = False


def _mpi_comm(env: Env) -> MPIComm:
    comm = MPIComm()
    if comm.world_size != env.world_size:
        raise RuntimeError(f"MPI COMM_WORLD has {comm.world_size} ranks but the launcher ({env.launcher}) says "
                           f"{env.world_size}: under srun use --mpi=pmi2 (or pmix), not --mpi=none")
    return comm


def make_comm(env: Env, backend: str = "auto") -> Comm:
    """'auto' follows the launcher: 1 rank is local, torchrun is torch, MPI and SLURM steps (srun --mpi=pmi2) MPI.

    'torch' from an MPI or SLURM launch brings torch.distributed up through MPI first.
    """
    if backend not in BACKENDS:
        raise ValueError(f"comm backend {backend!r} is not one of {BACKENDS}")
    if backend == "local" or (backend == "auto" and env.world_size == 1):
        if env.world_size != 1:
            raise ValueError(f"backend 'local' needs a 1-rank world, this one has {env.world_size} ranks")
        return LocalComm()
    if backend == "mpi" or (backend == "auto" and env.launcher in ("mpi", "slurm")):
        return _mpi_comm(env)
    dist = _torch().distributed
    owns = not dist.is_initialized()
    if owns:
        init_torch_distributed(env, _mpi_comm(env) if env.launcher in ("mpi", "slurm") else LocalComm())
    comm = TorchComm(owns_group=owns)
    if comm.world_size != env.world_size:
        raise RuntimeError(f"torch.distributed has {comm.world_size} ranks but the launcher says {env.world_size}")
    return comm


def init_torch_distributed(env: Env, comm: Comm, backend: str = "auto", timeout_s: float = 300) -> None:
    """Bring up torch.distributed from any launcher; torch has no MPI backend, so `comm` carries the address.

    torchrun: env://. MASTER_ADDR/MASTER_PORT set: tcp:// to them. Otherwise rank 0 opens a TCPStore on port 0
    (127.0.0.1 when all ranks share its host, else its hostname) and broadcasts the port, so no port can be taken
    between picking and binding. No-op when already initialised.
    """
    import datetime

    torch = _torch()
    dist = torch.distributed
    if dist.is_initialized():
        return
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"torch backend {backend!r} is not one of ('auto', 'gloo', 'nccl')")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=timeout_s)
    kw = dict(backend=backend, timeout=timeout)
    if env.launcher == "torchrun":  # env:// also handles the store that torchrun's agent hosts
        dist.init_process_group(init_method="env://", **kw)
        return
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        url = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        dist.init_process_group(init_method=url, rank=env.rank, world_size=env.world_size, **kw)
        return
    if comm.world_size != env.world_size:
        raise RuntimeError(f"comm has {comm.world_size} ranks but env says {env.world_size}: cannot share a port")
    one_node = len(set(comm.all_gather(socket.gethostname()))) == 1
    if env.rank == 0:
        host = "127.0.0.1" if one_node else socket.gethostname()
        store = dist.TCPStore(host, 0, env.world_size, True, timeout=timeout, wait_for_workers=False)
        comm.broadcast((host, store.port))
    else:
        host, port = comm.broadcast(None)
        store = dist.TCPStore(host, port, env.world_size, False, timeout=timeout)
    dist.init_process_group(store=store, rank=env.rank, world_size=env.world_size, **kw)


def destroy_torch_distributed(comm: Optional["Comm"] = None) -> None:
    """Tear down the default group if there is one (safe to call twice).

    With `comm`, every rank does it together: rank 0 hosts the TCPStore that the others are connected to, and
    destroying it while a peer still uses it ends that peer in a C++ terminate ("terminate called without an
    active exception", exit 6) — seen at exit of a 2-rank job.
    """
    dist = _torch().distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if comm is not None and comm.world_size > 1:
        comm.barrier()
    dist.destroy_process_group()
    if comm is not None and comm.world_size > 1 and not isinstance(comm, TorchComm):   # a TorchComm has no group now
        comm.barrier()


def start_together(comm: Comm, problem: Optional[str]) -> list[str]:
    """Every rank calls this before its stage starts, with what stops it (a spec or path problem) or None.

    Returns the same on every rank: [] when all may start, else one line per distinct problem, prefixed with the
    ranks that saw it unless all did. Ranks read the same spec, so a spec error is one line, not one per rank (the
    caller prints from rank 0); a path missing on one node only is named with its ranks. Every rank then returns
    on its own: no Abort, no rank left waiting for one that left."""
    seen = comm.all_gather(problem)
    ranks: dict[str, list[int]] = {}
    for rank, text in enumerate(seen):
        if text is not None:
            ranks.setdefault(text, []).append(rank)
    if len(ranks) == 1 and len(next(iter(ranks.values()))) == comm.world_size:
        return list(ranks)
    return [f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}: {text}" for text, r in ranks.items()]


def fail_together(comm: Comm, env: Env, error: BaseException, what: str) -> None:
    """Called on a rank whose stage raised: alone, re-raise; in a multi-rank job, print and abort every rank
    (exit 2 for a user error, 3 for a run stopped on purpose), because the other ranks would otherwise wait for this one forever."""
    if comm.world_size <= 1:
        raise error
    from hpcvid.config import EXIT_RUN_STOPPED, EXIT_USER_ERROR, RunStopped, UserError

    if isinstance(error, (UserError, RunStopped)):
        print(f"{what} (rank {env.rank}): {error}", file=sys.stderr, flush=True)
        time.sleep(_ABORT_GRACE_S)
        comm.abort(EXIT_USER_ERROR if isinstance(error, UserError) else EXIT_RUN_STOPPED)
    import traceback

    traceback.print_exception(error)
    print(f"{what}: rank {env.rank} failed; aborting all {comm.world_size} ranks", file=sys.stderr, flush=True)
    time.sleep(_ABORT_GRACE_S)
    comm.abort(1)


# mpiexec forwards ranks' output through its proxies; an Abort straight after printing lost the error line in 1 of
# 3 runs in CI. A short pause lets the line reach the terminal first.
_ABORT_GRACE_S = 0.5
