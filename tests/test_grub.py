"""The amd64 twin's boot selection (image/ab/grub.cfg) run by GRUB itself. grub-emu (GRUB built to run
as a program) reads a disk image laid out as the twin's card, its boot partition FAT with the
environment in EFI/edge/grubenv and grubenv.bak, and runs the script as the GRUB the firmware loads
would, up to `linux`, which grub-emu lacks: what it would boot and what it saved are read back. RAUC's
side is the image's own backend (image/overlay/usr/lib/edge/grubenv), run on copies of the same files,
as RAUC runs it for an install, a mark-good or a mark-bad."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ROOT

GRUB_CFG = ROOT / "image/ab/grub.cfg"
BACKEND = ROOT / "image/overlay/usr/lib/edge/grubenv"
MODULES = Path("/usr/lib/grub/x86_64-emu")
FAT = "@@1M"  # mtools: the boot partition starts 1 MiB into the card, as on the image

pytestmark = pytest.mark.skipif(
    not MODULES.is_dir()
    or any(shutil.which(t) is None for t in ("grub-emu", "grub-editenv", "mcopy", "sfdisk")),
    reason="needs grub-emu, grub-editenv (grub2-common), mtools and sfdisk")

# GRUB's first script when started as a program: the partition it was loaded from, as the firmware's
# GRUB has it in $cmdpath, then the twin's script; then what it chose, and out (`boot` failed: no kernel)
WRAPPER = f"""set cmdpath=(hd0,msdos1)/EFI/BOOT
source (host){GRUB_CFG}
echo "edge-test: slot=$slot disk=$disk part=$part"
reboot
"""
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def blk(order: str, a_ok: str, a_try: str, b_ok: str, b_try: str) -> dict[str, str]:
    return {"ORDER": order, "A_OK": a_ok, "A_TRY": a_try, "B_OK": b_ok, "B_TRY": b_try}


IMAGE_ENV = blk("A B", "1", "0", "0", "0")  # as image/build writes it
CUT = b"# GRUB Environment Block\nORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\n"  # a block cut short
# a whole block with one bit flipped on the card: B_TRY=3 read as 7
FLIPPED = (CUT + b"B_TRY=7\n").ljust(1024, b"#")


@pytest.fixture(scope="module")
def grub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GRUB's directory for grub-emu: its modules, and the wrapper as grub.cfg."""
    d = tmp_path_factory.mktemp("grub")
    for f in MODULES.iterdir():
        (d / f.name).symlink_to(f)
    (d / "grub.cfg").write_text(WRAPPER)
    return d


@dataclass(frozen=True)
class Boot:
    slot: str
    disk: str
    part: str
    said: tuple[str, ...]  # the script's own lines ("edge: ...")


class Card:
    """A card as the twin's: an MBR with the boot partition (FAT) and two root slots (left empty)."""

    def __init__(self, tmp: Path, grub_dir: Path) -> None:
        self.tmp, self.grub_dir = tmp, grub_dir
        self.disk = tmp / "card.img"
        with self.disk.open("wb") as f:
            f.truncate(24 << 20)
        table = "label: dos\nstart=2048, size=32768, type=ef\nsize=4096, type=83\nsize=4096, type=83\n"
        subprocess.run(["sfdisk", "-q", str(self.disk)], check=True, text=True, input=table)
        fat = f"{self.disk}{FAT}"
        subprocess.run(["mformat", "-i", fat, "::"], check=True)
        subprocess.run(["mmd", "-i", fat, "::/EFI", "::/EFI/edge"], check=True)
        (tmp / "device.map").write_text(f"(hd0) {self.disk}\n")
        self.host = tmp / "host"  # where RAUC's backend sees the boot partition's EFI/edge
        self.host.mkdir()

    def put(self, name: str, data: bytes) -> None:
        (self.tmp / "put").write_bytes(data)
        subprocess.run(["mcopy", "-o", "-i", f"{self.disk}{FAT}", str(self.tmp / "put"),
                        f"::/EFI/edge/{name}"], check=True)

    def get(self, name: str) -> bytes | None:
        out = self.tmp / "got"
        out.unlink(missing_ok=True)
        r = subprocess.run(["mcopy", "-n", "-i", f"{self.disk}{FAT}", f"::/EFI/edge/{name}", str(out)],
                           capture_output=True, check=False)
        return out.read_bytes() if r.returncode == 0 else None

    def set_env(self, values: dict[str, str], names: tuple[str, ...] = ("grubenv", "grubenv.bak")) -> None:
        block = self.tmp / "block"
        block.unlink(missing_ok=True)
        subprocess.run(["grub-editenv", str(block), "set", *(f"{k}={v}" for k, v in values.items())],
                       check=True)
        for name in names:
            self.put(name, block.read_bytes())

    def env(self, name: str = "grubenv") -> dict[str, str] | None:
        """The block as GRUB left it, or None when it is not one grub-editenv reads."""
        data = self.get(name)
        if data is None:
            return None
        (self.tmp / "read").write_bytes(data)
        r = subprocess.run(["grub-editenv", str(self.tmp / "read"), "list"], capture_output=True, text=True,
                           check=False)
        return dict(line.split("=", 1) for line in r.stdout.splitlines()) if r.returncode == 0 else None

    def boot(self) -> Boot:
        r = subprocess.run(["grub-emu", "-d", str(self.grub_dir), "-m", str(self.tmp / "device.map"),
                            "-r", "host"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=60, check=False)
        out = ANSI.sub("", r.stdout + r.stderr).replace("\r", "\n")
        chosen = re.search(r"edge-test: slot=(\S*) disk=(\S*) part=(\S*)", out)
        assert chosen, f"GRUB did not get through the script:\n{out}"
        said = tuple(m.group(0) for m in re.finditer(r"edge: [^\n]*", out))
        return Boot(*chosen.groups(), said=said)

    def rauc(self, *args: str) -> str:
        """RAUC's call of the image's backend, on the boot partition's two files."""
        for name in ("grubenv", "grubenv.bak"):
            data = self.get(name)
            if data is not None:
                (self.host / name).write_bytes(data)
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "EDGE_GRUBENV": str(self.host / "grubenv")}
        r = subprocess.run([str(BACKEND), *args], capture_output=True, text=True, check=True, env=env)
        for name in ("grubenv", "grubenv.bak"):
            self.put(name, (self.host / name).read_bytes())
        return r.stdout.strip()


@pytest.fixture
def card(tmp_path: Path, grub_dir: Path) -> Iterator[Card]:
    yield Card(tmp_path, grub_dir)


def booted(card: Card, slot: str) -> Boot:
    b = card.boot()
    assert (b.slot, b.disk, b.part) == (slot, "hd0", "2" if slot == "A" else "3"), b
    assert f"edge: booting slot {slot} (" in b.said[-1]
    return b


def test_a_kept_slot_boots_as_long_as_edge_marks_it_good(card: Card) -> None:
    card.set_env(IMAGE_ENV)
    for _ in range(5):  # more boots than there are tries: each marked good by edge once healthy
        booted(card, "A")
        assert card.env() == {**IMAGE_ENV, "A_TRY": "1"}  # the try is counted before the kernel starts
        card.rauc("set-state", "A", "good")
        assert card.env() == card.env("grubenv.bak") == IMAGE_ENV


def test_a_new_slot_never_confirmed_is_tried_three_times_then_left(card: Card) -> None:
    card.set_env(IMAGE_ENV)
    card.rauc("set-primary", "B")  # an install into B
    for n in (1, 2, 3):  # a v2 that hangs before edge says anything, or power cuts: never marked
        assert card.rauc("get-primary") == "B"  # what RAUC reports as next is what GRUB boots
        booted(card, "B")
        assert card.env() == blk("B A", "1", "0", "1", str(n))
    assert card.rauc("get-primary") == "A"
    booted(card, "A")
    card.rauc("set-state", "B", "bad")  # edge's view at the next start: rolled back, the slot left bad
    card.rauc("set-state", "A", "good")
    for _ in range(2):
        booted(card, "A")
        card.rauc("set-state", "A", "good")
    assert card.env() == blk("B A", "1", "0", "0", "0")


def test_a_slot_marked_bad_is_left_at_the_next_boot(card: Card) -> None:
    card.set_env(IMAGE_ENV)
    card.rauc("set-primary", "B")
    booted(card, "B")
    card.rauc("set-state", "B", "bad")  # its edge failed its trial
    assert card.rauc("get-primary") == "A"
    booted(card, "A")
    assert card.env() == blk("B A", "1", "1", "0", "0")


@pytest.mark.parametrize(("env", "slot", "saved"), [
    # both tried 3 times unconfirmed: rather than no boot, the first good one in ORDER, counts reset
    (blk("B A", "1", "3", "1", "3"), "B", {"A_TRY": "0", "B_TRY": "0"}),
    (blk("A B", "1", "3", "0", "0"), "A", {"A_TRY": "0", "B_TRY": "0"}),
    # none good (both marked bad): slot A, the one the image was flashed with
    (blk("B A", "0", "0", "0", "0"), "A", {"A_TRY": "0", "B_TRY": "0"}),
])
def test_with_no_slot_left_to_try_the_card_still_boots(card: Card, env: dict[str, str], slot: str,
                                                       saved: dict[str, str]) -> None:
    card.set_env(env)
    b = booted(card, slot)
    assert "edge: no slot left to try; counts reset" in b.said
    assert card.env() == {**env, **saved}


@pytest.mark.parametrize("damage", [b"", b"\0" * 1024, b"# GRUB Environment Block\nORDER=B A\nB_", FLIPPED],
                         ids=["empty", "zeroed", "cut short", "a bit flipped"])
def test_a_damaged_environment_is_read_from_its_backup(card: Card, damage: bytes) -> None:
    """A power cut in a rewrite in place (RAUC's own grub backend, or anything else) leaves the file empty,
    zeroed or cut short, and a card that lies flips a bit: GRUB reads the backup, counts the try there,
    and the next write by RAUC's backend makes both whole again."""
    env = blk("B A", "1", "0", "1", "0")
    card.set_env(env, names=("grubenv.bak",))
    card.put("grubenv", damage)
    b = booted(card, "B")
    assert "edge: GRUB's environment is damaged: its backup is read" in b.said
    assert card.env("grubenv.bak") == {**env, "B_TRY": "1"}
    assert card.get("grubenv") == damage  # GRUB writes only the file it read
    assert card.rauc("get-primary") == "B"
    card.rauc("set-state", "B", "good")  # v2 healthy: edge's mark-good
    assert card.env() == card.env("grubenv.bak") == env
    b = booted(card, "B")
    assert not any("damaged" in line for line in b.said)


@pytest.mark.parametrize("backup", [None, b"", CUT + b"B_TRY=\n"])
def test_with_both_blocks_damaged_the_card_boots_slot_a(card: Card, backup: bytes | None) -> None:
    card.put("grubenv", CUT + b"B_T")
    if backup is not None:
        card.put("grubenv.bak", backup)
    b = booted(card, "A")
    assert "edge: its backup is damaged too" in b.said
    with pytest.raises(subprocess.CalledProcessError):
        card.rauc("get-primary")  # RAUC's backend takes neither either: no install, no mark-good
