"""Train dipsen on a real Flower deployment on this machine, with TLS, and print where the run folder is.

What it does (see ``dipsen.federated.flower.launch.deploy_on_loopback``):

1. resolves the training options as ``dipsen train`` does and creates the run folder;
2. exports each client's training rows to a file of its own (``WORKDIR/partitions/client_NNNN.npz``);
3. makes a throw-away CA and a server certificate for 127.0.0.1 (``WORKDIR/certificates``) and a
   key pair per client (``WORKDIR/node-keys``, private keys readable by their owner only);
4. starts ``flower-superlink`` with TLS and SuperNode authentication, enrols each client's public key
   (``flwr supernode register``; node id -> client in ``WORKDIR/enrolled_nodes.json``), and starts one
   ``flower-supernode`` per client, each a separate process that is given only its own partition file
   (``--node-config partition-file=...``) and its own private key, all on loopback, with runtime
   dependency installation off;
5. submits the run with ``flwr run`` (the ServerApp messages only the enrolled nodes), waits for it to finish (following the run folder, asking
   ``flwr ls --format json`` now and then), saves Flower's log as ``flower.log`` in the run folder,
   and stops every process it started, also on Ctrl-C, SIGTERM or SIGHUP.

Example (3 clients, all 3 per round, 3 rounds on 3,000 MNIST images)::

    python scripts/flower_deployment.py --clients 3 --fraction 1 --rounds 3 --train-subset 3000 \\
        --test-subset 1000 --model cnn --out runs
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from dipsen.config import load_config
from dipsen.federated.flower.launch import deploy_on_loopback
from dipsen.federated.run_dir import RunDir
from dipsen.federated.workers import STOP_SIGNALS, Interrupted, StopFlag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="TOML file of training options; flags override it")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="folder that receives the run folder")
    parser.add_argument("--workdir", type=Path, help="partition files, certificates, process logs (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the run may take")
    for name, kind in [
        ("dataset", str),
        ("model", str),
        ("clients", int),
        ("fraction", float),
        ("rounds", int),
        ("partition", str),
        ("local-epochs", int),
        ("batch-size", int),
        ("optimizer", str),
        ("lr", float),
        ("seed", int),
        ("train-subset", int),
        ("test-subset", int),
    ]:
        parser.add_argument(f"--{name}", type=kind)
    args = parser.parse_args()
    options = {k: v for k, v in vars(args).items() if k not in ("config", "out", "workdir", "timeout")}
    config = load_config(args.config, {**options, "engine": "flower"})
    run = RunDir.create(args.out, config)
    print(f"run folder: {run.path} (K={config.clients}, m={config.clients_per_round}/round, {config.rounds} rounds)")
    stop = StopFlag()
    for signum in STOP_SIGNALS:  # a signal only sets the flag: the deployment then stops its processes
        if signal.getsignal(signum) != signal.SIG_IGN:  # nohup's hang-up stays ignored
            signal.signal(signum, lambda received, frame: stop.set(received))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dipsen-deployment-") as scratch:
        workdir = args.workdir or Path(scratch)
        try:
            deployment = deploy_on_loopback(run, workdir, timeout=args.timeout, stop=stop)
        except Interrupted as exc:
            print(f"interrupted by {exc}; every process stopped; run folder: {run.path}", file=sys.stderr)
            sys.exit(128 + exc.signum)
    print(
        f"Flower status: {deployment.status}; test accuracy {deployment.metrics['accuracy']:.4f} after "
        f"{deployment.metrics['rounds']} rounds; {time.perf_counter() - start:.1f} s; "
        f"stopped {len(deployment.pids)} processes"
    )


if __name__ == "__main__":
    main()
