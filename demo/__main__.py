"""keylease demo on embedded defaults: everything real, nothing mocked, all on this machine.

1. Provision a software TPM (swtpm) with an EK certificate from a local TPM-manufacturer CA, and
   "boot" it: its PCRs are extended with the events of a real OVMF boot event log (captured from
   the project's VM, tests/data/eventlogs), which the agent sends as its firmware's log.
2. Start the broker (keylease-kbs) on SQLite with TLS on 127.0.0.1.
3. The agent enrolls and attests; the operator approves the node, learns a boot policy from its
   verified boot (named components: firmware, boot application, Secure Boot, kernel command
   line...), shows it, imports an image key and grants it; the agent attests again and installs
   the key.
4. skopeo encrypts a small OCI image to the key's public half and decrypts it with the key the
   agent installed; the secret inside the image is printed.
5. The same image, encrypted, in a registry on 127.0.0.1 (Debian's docker-registry), pulled the
   way kubelet pulls it: through containerd's CRI (``ImageService.PullImage``) on a private
   containerd 1.6 whose ctd-decoder reads the agent's containerd key directory; the secret is
   read back from the unpacked layer.
6. A stranger asks the broker for the node's nonces: refused UNAUTHENTICATED (node calls carry a
   MAC made with a key only the node's TPM can recover); the node attests again and keeps its key.
7. Another kernel boots (the firmware measures a different image into PCR 4): the broker denies,
   naming the boot application and what the policy allows, and the agent removes the key.
8. The operator allows that kernel (the node is its own canary): the agent gets its key back, and
   holds the broker's approvals of both kernels (`keylease-agent status`).
9. The broker stops; the TPM "reboots" into the first kernel: `keylease-agent run` restores the key
   from its sealed cache, offline, under the approval of that kernel; then a third kernel boots,
   which nothing approves: nothing is restored, and the log names the boot application.

Working files go to ./demo-run (replaced on every run).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.broker import AGENT, KBS, Broker, write_agent_config
from harness.containerd import Containerd
from harness.cri import CriError
from harness.daemon import AgentDaemon
from harness.eventlog import extend_tpm, oracle_events, replace_digest
from harness.keys import write_key
from harness.netops import node_call, secure_channel
from harness.oci import make_oci_image, read_file_from_image, skopeo_decrypt, skopeo_encrypt
from harness.registry import Registry
from harness.runtimes import RuntimeToolMissing, runtime_tools
from harness.swtpm import Swtpm, SwtpmCa, provision
from keylease.api.v1 import keylease_pb2 as pb
from keylease.api.v1.nodeauth import GET_NONCE

NODE = "worker-1"
CRI_PLUGIN = 'plugins."io.containerd.grpc.v1.cri"'
OVMF_LOG = Path(__file__).resolve().parents[1] / "tests" / "data" / "eventlogs" / "ovmf-base.bin"
KERNEL = bytes.fromhex("80ab823ee197f0732f8715ff0872fb2805978defeaf61709237883fe92a905aa")
BOLD, DIM, RED, GREEN, RESET = ("\033[1m", "\033[2m", "\033[31m", "\033[32m", "\033[0m")


def step(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def sh(
    argv: list[str], expect: int = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    shown = [Path(a).name if a in (AGENT, KBS) else a for a in argv]
    print(f"{DIM}$ {shlex.join(shown)}{RESET}", flush=True)
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, TSS2_LOG="esys+none", **(env or {})),
    )
    out = (proc.stdout + proc.stderr).strip()
    if out:
        print("  " + out.replace("\n", "\n  "))
    if proc.returncode != expect:
        raise SystemExit(f"{RED}demo: expected exit {expect}, got {proc.returncode}{RESET}")
    return proc


def main() -> int:
    work = Path("demo-run").resolve()
    key_dirs = [work / "crio-keys", work / "containerd-keys"]
    unmount_key_tmpfs(key_dirs)  # left over from an interrupted run
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        return run_demo(work, key_dirs)
    finally:
        unmount_key_tmpfs(key_dirs)


def mount_key_tmpfs(key_dirs: list[Path]) -> list[str]:
    """What the shipped systemd mount units do on a node: a tmpfs on each <key_dir>/keylease,
    so plaintext keys never reach a disk. Returns extra agent config lines."""
    for d in key_dirs:
        (d / "keylease").mkdir(parents=True)
        done = subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                "mode=0700,nosuid,nodev,noexec,size=4m",
                "tmpfs",
                str(d / "keylease"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            print(
                f"  {RED}cannot mount a tmpfs ({done.stderr.strip()}); the demo runs with "
                f"unsafe_allow_disk_key_dirs = true{RESET}"
            )
            return ["unsafe_allow_disk_key_dirs = true"]
        print(f"  tmpfs mounted on {d / 'keylease'} (as systemd/*.mount do on a node)")
    return []


def unmount_key_tmpfs(key_dirs: list[Path]) -> None:
    for d in key_dirs:
        if os.path.ismount(d / "keylease"):
            subprocess.run(["umount", str(d / "keylease")], check=False)


def cri_pull(work: Path, key_dir: Path, image: Path, public: Path) -> None:
    """Push ``image`` encrypted to ``public`` into a registry on 127.0.0.1, then pull it
    through the CRI of a private containerd whose ctd-decoder reads ``key_dir`` (where the
    agent installed the key); print the secret from the unpacked layer."""
    try:
        tools = runtime_tools()
    except RuntimeToolMissing as exc:
        print(f"  {RED}skipped: {exc}{RESET}")
        return
    ctd_dir = Path(tempfile.mkdtemp(prefix="kl-demo-ctd-", dir="/tmp"))  # short socket path
    try:
        with Registry(work / "registry", tools.docker_registry) as registry:
            reference = registry.push(image, "v1", "demo/secret-image", [public])
            types = ", ".join(sorted(set(registry.layer_types("demo/secret-image", "v1"))))
            print(f"  pushed {reference} (layers: {types})")
            containerd = Containerd(
                ctd_dir, binary=tools.containerd, ctd_decoder=tools.ctd_decoder,
                key_dir=key_dir, insecure_registries=[registry.host],
            )  # fmt: skip
            with containerd, containerd.cri() as cri:
                version = cri.version()
                kept = work / "containerd-config.toml"
                shutil.copyfile(containerd.config_path, kept)
                print(
                    f"  {version.runtime_name} {version.runtime_version} (CRI "
                    f"{version.runtime_api_version}), private to this demo, configured as on a "
                    f"node (a copy of its config: {kept}):\n"
                    f'    [{CRI_PLUGIN}.image_decryption] key_model = "node"\n'
                    "    encrypted layers go through the stream processor\n"
                    f"    {tools.ctd_decoder} --decryption-keys-path {key_dir}\n"
                    "    (it reads the whole directory, the agent's keylease/ included)"
                )
                try:
                    pulled = cri.pull_image(reference)
                except CriError as exc:
                    raise SystemExit(f"{RED}demo: the CRI pull failed: {exc}{RESET}") from None
                print(
                    f"  CRI ImageService.PullImage {reference} -> {pulled.image_ref[:19]}... in "
                    f"{pulled.seconds * 1000:.0f} ms (ctd-decoder decrypted the layer)"
                )
                found = containerd.unpacked("secret.txt")
                if len(found) != 1:
                    raise SystemExit(f"{RED}demo: {len(found)} unpacked secret.txt files{RESET}")
                text = found[0].decode().strip()
                print(f"  {GREEN}secret.txt in containerd's unpacked layer: {text}{RESET}")
    finally:
        shutil.rmtree(ctd_dir, ignore_errors=True)


def run_demo(work: Path, key_dirs: list[Path]) -> int:

    step("1. A software TPM with an EK certificate from a local manufacturer CA (swtpm)")
    ca = SwtpmCa(work / "tpm-ca")
    provision(work / "tpm", ca)
    (work / "ek-roots.pem").write_bytes(ca.bundle_pem())
    print(f"  TPM state {work / 'tpm'}; EK roots {work / 'ek-roots.pem'}")

    with Swtpm(work / "tpm") as tpm:
        boot_log = work / "binary_bios_measurements"
        boot_log.write_bytes(OVMF_LOG.read_bytes())
        extend_tpm(tpm.tcti, oracle_events(boot_log))
        print(f"  booted: PCRs extended with the {len(oracle_events(boot_log)) - 1} events of a")
        print(f"  real OVMF boot log ({OVMF_LOG.name}); the agent sends it as {boot_log.name}")
        step("2. The broker: init (TLS CA, server cert, master key) and serve on 127.0.0.1")
        broker = Broker(work / "kbs", work / "ek-roots.pem", enrollment="manual")
        print("  " + broker.init_output.strip().replace("\n", "\n  "))
        with broker:
            print(f"  keylease-kbs serving on {broker.address} (log: {broker.log_path})")
            kbs = [KBS, "--config", str(broker.config)]
            extra = mount_key_tmpfs(key_dirs)
            agent_cfg = write_agent_config(
                work / "agent.toml",
                broker=broker,
                tcti=tpm.tcti,
                state_dir=work / "agent-state",
                key_dirs=key_dirs,
                node_name=NODE,
                extra_lines=extra,
                event_log=boot_log,
            )
            agent = [AGENT, "--config", str(agent_cfg), "attest", "--once"]

            step("3. The agent enrolls (EK cert, AK credential activation) and attests")
            sh(agent, expect=3)

            step("4. The operator approves the node, learns its boot policy, imports, grants a key")
            sh([*kbs, "node", "list"])
            sh([*kbs, "node", "approve", NODE, "--label", "cluster=demo"])
            sh([*kbs, "policy", "learn", "demo-boot", "--from-node", NODE])
            sh([*kbs, "policy", "show", "demo-boot"])
            sh([*kbs, "policy", "assign", "demo-boot", "--selector", "cluster=demo"])
            write_key(work / "image-key.pem", rsa.generate_private_key(65537, 3072))
            sh([*kbs, "key", "import", "demo-key", "--private-key", str(work / "image-key.pem")])
            (work / "image-key.pem").unlink()  # the broker holds it now, encrypted
            sh([*kbs, "grant", "add", "demo-key", "--selector", "cluster=demo"])

            step("5. The agent attests again and installs the key it is granted")
            sh(agent)
            installed = key_dirs[0] / "keylease" / "demo-key.v1.pem"
            sh([*kbs, "key", "show", "demo-key"])

            step("6. skopeo encrypts an image to the key; the installed key file decrypts it")
            secret = b"hello from an encrypted layer: keylease works\n"
            make_oci_image(work / "image-plain", "v1", {"secret.txt": secret})
            skopeo_encrypt(work / "image-plain", "v1", work / "image-enc", work / "image-key.pub")
            print(f"  encrypted: oci:{work / 'image-enc'}:v1 (jwe)")
            skopeo_decrypt(work / "image-enc", "v1", work / "image-dec", [installed])
            text = read_file_from_image(work / "image-dec", "v1", "secret.txt").decode().strip()
            print(f"  {GREEN}decrypted secret.txt: {text}{RESET}")

            step("7. containerd pulls the encrypted image through its CRI, as kubelet does")
            cri_pull(work, key_dirs[1], work / "image-plain", work / "image-key.pub")

            step("8. A stranger asks the broker for worker-1's nonces: refused, the key stays")
            print(f"  {stranger_nonces(broker, 33)}")
            sh(agent)
            if not installed.exists():
                raise SystemExit(f"{RED}demo: the stranger cost the node its key{RESET}")

            step(
                "9. Another kernel boots: the broker denies, naming the boot application, and "
                "the agent removes the key"
            )
            tpm.restart()  # a reboot: the PCRs start over
            other = replace_digest(OVMF_LOG.read_bytes(), KERNEL, bytes.fromhex("9f2c" * 16))
            boot_log.write_bytes(other)
            extend_tpm(tpm.tcti, oracle_events(boot_log))
            print("  rebooted; the firmware measured another kernel image into PCR 4")
            sh(agent, expect=4)
            left = sorted(p.name for p in installed.parent.iterdir())
            print(f"  {installed.parent}: {left or 'empty'}")
            if installed.exists():
                raise SystemExit(f"{RED}demo: the key was not removed{RESET}")
            sh([*kbs, "node", "show", NODE])
            sh([*kbs, "audit", "--node", NODE])

            step("10. The operator allows that kernel: the key is back, with approvals for both")
            sh([*kbs, "policy", "allow", "demo-boot", "--from-node", NODE])
            sh(agent)
            sh([AGENT, "--config", str(agent_cfg), "status"])

        step(
            "11. Broker stopped; the TPM reboots into the first kernel: the agent restores its "
            "key from the sealed cache, offline"
        )
        for kernel, approved in ((KERNEL, True), (bytes.fromhex("5a" * 32), False)):
            tpm.restart()
            log = OVMF_LOG.read_bytes()
            boot_log.write_bytes(log if kernel == KERNEL else replace_digest(log, KERNEL, kernel))
            extend_tpm(tpm.tcti, oracle_events(boot_log))
            what = "the first kernel" if approved else "a third kernel, which nothing approves"
            print(f"  rebooted into {what}; the key directory is a tmpfs: empty after a reboot")
            for f in (f for d in key_dirs for f in (d / "keylease").iterdir()):
                f.unlink()
            restore_offline(work, agent_cfg, installed, approved)
    print(f"\n{GREEN}{BOLD}demo complete{RESET} (files in {work})")
    return 0


def restore_offline(work: Path, config: Path, installed: Path, expect_key: bool) -> None:
    """`keylease-agent run` with the broker down, until it has restored the key or said why it
    cannot; its restore line is shown."""
    print(f"{DIM}$ keylease-agent --config {config} run{RESET}", flush=True)
    log = work / f"agent-run-{'restored' if expect_key else 'refused'}.log"
    daemon = AgentDaemon(config, log).start()
    deadline = time.monotonic() + 20
    try:
        while not (
            said := "restored demo-key" in daemon.log() or "nothing restored" in daemon.log()
        ):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        daemon.stop()
    line = next((ln for ln in daemon.log().splitlines() if "restored" in ln), "(no restore line)")
    print("  " + line)
    if not said or installed.exists() != expect_key:
        raise SystemExit(f"{RED}demo: the offline restore did not do what it should{RESET}")
    colour = GREEN if expect_key else RED
    print(f"  {colour}{installed.name}: {'restored' if installed.exists() else 'absent'}{RESET}")


def stranger_nonces(broker: Broker, count: int) -> str:
    """``count`` GetNonce calls naming the node, without its key (what anyone on the network can
    send); they once evicted the nonce its agent was about to use."""
    answers = set()
    with secure_channel(broker.address, broker.ca) as channel:
        for _ in range(count):
            request = pb.GetNonceRequest(node_name=NODE)
            try:
                node_call(channel, GET_NONCE, request, pb.GetNonceResponse)
                answers.add("OK: a nonce")
            except grpc.RpcError as exc:
                answers.add(f"{exc.code().name}: {exc.details()}")
    return f"{count} x GetNonce(node_name={NODE!r}) from a stranger -> " + " | ".join(answers)


if __name__ == "__main__":
    sys.exit(main())
