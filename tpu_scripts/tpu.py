#!/usr/bin/env python3
"""Cloud TPU VM jobs for fmjax: create, setup, launch, watch, stop, delete.

Every subcommand builds the exact `gcloud` commands it runs; `--dry-run` prints
them (one per line, shell-quoted) and runs nothing.

    python tpu_scripts/tpu.py create --name fm --zone us-east5-a --type v5litepod-8
    python tpu_scripts/tpu.py setup  --name fm --zone us-east5-a --repo URL
    python tpu_scripts/tpu.py launch --name fm --zone us-east5-a \
        --workdir gs://bucket/runs/gpt -- --config configs/gpt_lm.py:base
    python tpu_scripts/tpu.py watch  --name fm --zone us-east5-a \
        --workdir gs://bucket/runs/gpt --stall-minutes 20
    python tpu_scripts/tpu.py delete --name fm --zone us-east5-a

On a TPU VM every worker runs the same `fmjax train`; JAX finds the
coordinator and the process ids itself (no flags), and each worker reads only
its own slice of the data.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

DEFAULT_VERSION = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
LOG = "/tmp/fmjax_train.log"


def runtime_version(accelerator_type: str) -> str:
    family = accelerator_type.rsplit("-", 1)[0]
    return DEFAULT_VERSION.get(family, "tpu-ubuntu2204-base")


def tpu_vm(*args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", *args]


def ssh_all(name: str, zone: str, command: str, project: str = "") -> list[str]:
    cmd = tpu_vm("ssh", name, f"--zone={zone}", "--worker=all", f"--command={command}")
    return cmd + ([f"--project={project}"] if project else [])


def create_commands(a) -> list[list[str]]:
    version = a.version or runtime_version(a.type)
    project = [f"--project={a.project}"] if a.project else []
    if a.queued:
        cmd = [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            a.name,
            f"--node-id={a.name}",
            f"--zone={a.zone}",
            f"--accelerator-type={a.type}",
            f"--runtime-version={version}",
        ]
        cmd += ["--spot"] if a.spot else []
        return [cmd + project]
    cmd = tpu_vm(
        "create",
        a.name,
        f"--zone={a.zone}",
        f"--accelerator-type={a.type}",
        f"--version={version}",
    )
    cmd += ["--spot"] if a.spot else []
    return [cmd + project]


def setup_commands(a) -> list[list[str]]:
    install = (
        f"set -e; rm -rf ~/fmjax; git clone --depth 1 {shlex.quote(a.repo)} ~/fmjax"
        f" && cd ~/fmjax && python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip"
        f" && ~/venv/bin/pip install -q -e '.[tpu]' 'jax[tpu]==0.10.2'"
    )
    return [ssh_all(a.name, a.zone, install, a.project)]


def train_command(workdir: str, train_args: list[str]) -> str:
    args = " ".join(shlex.quote(x) for x in ["--workdir", workdir, *train_args])
    return f"cd ~/fmjax && nohup ~/venv/bin/fmjax train {args} > {LOG} 2>&1 &"


def launch_commands(a) -> list[list[str]]:
    return [ssh_all(a.name, a.zone, train_command(a.workdir, a.train_args), a.project)]


def stop_commands(a) -> list[list[str]]:
    # SIGTERM first: fmjax saves a checkpoint at the next step boundary.
    kill = "pkill -TERM -f 'fmjax train' || true"
    return [ssh_all(a.name, a.zone, kill, a.project)]


def delete_commands(a) -> list[list[str]]:
    project = [f"--project={a.project}"] if a.project else []
    if a.queued:
        return [
            [
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "delete",
                a.name,
                f"--zone={a.zone}",
                "--force",
                "--quiet",
                *project,
            ]
        ]
    return [tpu_vm("delete", a.name, f"--zone={a.zone}", "--quiet", *project)]


def metrics_command(workdir: str) -> list[str]:
    path = f"{workdir.rstrip('/')}/metrics.jsonl"
    if workdir.startswith("gs://"):
        return ["gcloud", "storage", "cat", path]
    return ["cat", path]


def logs_command(a) -> list[str]:
    return ssh_all(a.name, a.zone, f"tail -n 20 {LOG}", a.project)


def last_step(metrics_text: str) -> int:
    steps = [json.loads(line)["step"] for line in metrics_text.splitlines() if line]
    return max(steps, default=-1)


def call(cmd: list[str]) -> int:
    try:
        return subprocess.call(cmd)
    except FileNotFoundError:
        print(f"{cmd[0]}: not found (install the Google Cloud CLI)", file=sys.stderr)
        return 127


def run(cmds: list[list[str]], dry_run: bool) -> int:
    for cmd in cmds:
        print(shlex.join(cmd), flush=True)
        if not dry_run:
            code = call(cmd)
            if code:
                return code
    return 0


def watch(a) -> int:
    """Streams the workers' log tails; stops the job when no step has been logged
    for `--stall-minutes` (a dead or hung worker stalls every other one)."""
    print(shlex.join(metrics_command(a.workdir)))
    print(shlex.join(logs_command(a)))
    if a.dry_run:
        print(shlex.join(stop_commands(a)[0]))
        return 0
    best, since = -1, time.time()
    while True:
        out = subprocess.run(metrics_command(a.workdir), capture_output=True, text=True)
        step = last_step(out.stdout) if out.returncode == 0 else -1
        call(logs_command(a))
        if step > best:
            best, since = step, time.time()
        elif time.time() - since > a.stall_minutes * 60:
            print(f"no progress past step {best} for {a.stall_minutes} min: stopping")
            run(stop_commands(a), False)
            return 1
        time.sleep(a.poll_seconds)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)

    def common(name, help_):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--name", required=True)
        s.add_argument("--zone", required=True)
        s.add_argument("--project", default="")
        s.add_argument("--dry-run", action="store_true", help="print, run nothing")
        return s

    s = common("create", "create a TPU VM or a queued resource")
    s.add_argument("--type", required=True, help="e.g. v5litepod-8, v4-32, v5p-64")
    s.add_argument("--version", default="", help="runtime version (default by type)")
    s.add_argument("--queued", action="store_true", help="use a queued resource")
    s.add_argument("--spot", action="store_true")
    s = common("setup", "install fmjax on every worker")
    s.add_argument("--repo", required=True, help="git URL of this repository")
    s = common("launch", "start the same fmjax train on every worker")
    s.add_argument("--workdir", required=True, help="gs://bucket/path for multi-host")
    s.add_argument("train_args", nargs=argparse.REMAINDER, help="-- fmjax train args")
    s = common("watch", "stream logs; stop the job if steps stall")
    s.add_argument("--workdir", required=True)
    s.add_argument("--stall-minutes", type=float, default=20.0)
    s.add_argument("--poll-seconds", type=float, default=60.0)
    common("stop", "SIGTERM fmjax on every worker (it checkpoints, then exits)")
    s = common("delete", "delete the TPU VM or queued resource")
    s.add_argument("--queued", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.action == "launch":
        a.train_args = [x for x in a.train_args if x != "--"]
        if not a.train_args or "--config" not in a.train_args:
            print(
                "launch needs fmjax train arguments after --, e.g. -- --config "
                "configs/gpt_lm.py:base",
                file=sys.stderr,
            )
            return 2
    if a.action == "watch":
        return watch(a)
    builders = {
        "create": create_commands,
        "setup": setup_commands,
        "launch": launch_commands,
        "stop": stop_commands,
        "delete": delete_commands,
    }
    return run(builders[a.action](a), a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
