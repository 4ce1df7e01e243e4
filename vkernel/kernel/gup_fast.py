"""GUP-fast: the lockless page-table walk and its slow-path fallback (mm/gup.c gup_fast_fallback).

``get_user_pages_fast_only`` / ``get_user_pages_fast`` / ``pin_user_pages_fast`` follow A.7:
flag whitelist, MMF_HAS_PINNED, -EOVERFLOW/-EFAULT argument rules, the ``write_protect_seq``
check for pins, then a walk that contains **no await** (interrupts disabled, see
``vkernel.kernel.tlb``) and stops at the first entry it may not take; the remainder goes to the
slow path (``__gup_longterm_locked`` with FOLL_TOUCH|FOLL_UNLOCKABLE) unless FOLL_FAST_ONLY.

The walk is vectorised per leaf table: the PGD/PUD entries are read once per 1 GiB and the PMD
entry once per 2 MiB, then the PTEs of the consecutive leaf tables are copied once
(``ptep_get_lockless`` for all of them), checked, the folios checked from their flags, the
whole prefix that passed grabbed (a speculative ``try_grab_folio_fast`` per page), and the PTEs
and PMDs re-read: on a change the grabs from the first changed entry on are undone and the walk
stops there. A PMD-mapped THP is taken with one grab of all covered subpages
(``record_subpages`` + one ``try_grab_folio_fast``). Every reference is mirrored into the numpy
ledgers ``kernel.extra_refs`` (per frame) / ``extra_pins`` (per 2 MiB block) like stream A's
``try_grab_folio``.

Two ways through a leaf-table stretch (:func:`_gup_pte_range`):

- common case, prefaulted small anon pages -- contiguous pfns, equal PTE bits, equal folio
  flags, nothing to stop at: the checks are bytes comparisons (entry ``i`` less
  ``i << PAGE_SHIFT`` all equal), the folio flags a slice, the grab and its mirror two slice
  additions, the recheck a bytes comparison, ``pages`` a copy from a cached arange: no gather,
  no scatter, no reduction;
- anything else (:func:`_gup_pte_general`, same snapshot): one reduction for the PTE bits,
  shift+mask for the pfns, one ``take`` of the folio flags, ``np.add.at`` for the refcount and
  for the mirror (a pfn may repeat).

Stop conditions (A.7 §3): not present, PROT_NONE, WRITE without RW, special (the shared zero
page included), a free folio (refcount 0), FOLL_LONGTERM on a ZONE_MOVABLE folio or a dax
(devmap) frame, PIN|LONGTERM|WRITE on a file folio that is not shmem (``gup_fast_folio_allowed``),
a R/O pin that must unshare (``gup_must_unshare`` with no VMA), the PTE or PMD changed after
the grab.
The walker never looks at VMAs, so FOLL_FORCE never helps it.

Cost (bench_gup_fast, 512 pages, against perf-floor §4's flat gup on the same PTEs in the same
run): the common case is ~0.55-0.6 of the floor's pages/s; what is left is mostly Python -- the
async entry point, argument rules, the IRQ/seqcount bracket and the upper-level walk (~3 µs a
call) and ~40 lines of checks around ~10 short numpy calls (the floor has 7 numpy calls and no
upper levels, no folio flags, no second ledger). The general path costs about twice the floor.
Keeping ``kernel.extra_refs`` exact is one slice addition (common case) or one ``np.add.at``
(it was a Counter costing ~55 ns per small page; see bench_gup_fast's ``mirror_ns_per_page``
and docs/gup-interface.md, stream B).

Counters: ``fast_gup`` (pages the lockless walk took, net of undo) and ``fast_gup_slow`` (calls
that fell back), next to Linux's ``nr_foll_pin_acquired``. ``kernel.config.arch == "generic"``
has no GUP-fast at all: every call takes the slow path (the 2008 fallback macro) and
``get_user_pages_fast_only`` returns 0 (seed 003's "always returning 0").

Test-only: ``tlb_state(kernel).park_hook`` is called as ``hook("pmd", pte_table_pfn)`` after
the walker read a PMD pointing to a PTE table (before it reads the PTEs), as
``hook("huge", head_pfn)`` after it read a huge PMD, and as ``hook("grabbed", n)`` after a
grab, before the recheck. A test parks a walker thread inside the hook (IRQs stay off); on
return the walker re-reads its table and, if it finds the tlb debug poison, reports a detected
use-after-free (``PageTableUseAfterFree``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import numpy.typing as npt

from vkernel.kernel.gup import Locked, __gup_longterm_locked, valid_gup_flags
from vkernel.kernel.tlb import POISON, PageTableUseAfterFree, TlbState, tlb_state
from vkernel.kernel.uapi import (
    _PAGE_PFN_MASK,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SPECIAL,
    _PAGE_USER,
    FOLL_FAST_ALLOWED,
    FOLL_FAST_ONLY,
    FOLL_GET,
    FOLL_LONGTERM,
    FOLL_PIN,
    FOLL_TOUCH,
    FOLL_UNLOCKABLE,
    FOLL_WRITE,
    GUP_PIN_COUNTING_BIAS,
    HPAGE_PMD_ORDER,
    MMF_HAS_PINNED,
    PAGE_MASK,
    PAGE_SHIFT,
    PGDIR_SHIFT,
    PMD_MASK,
    PMD_SHIFT,
    PTRS_PER_TABLE,
    PUD_SHIFT,
    TASK_SIZE,
    PG_anon,
    PG_anon_exclusive,
    PG_buddy,
    PG_head,
    PG_movable_zone,
    PG_referenced,
    PG_reserved,
    PG_shmem,
    PG_tail,
)

if TYPE_CHECKING:
    from vkernel.kernel.kernel import Kernel
    from vkernel.kernel.mm import MmStruct
    from vkernel.kernel.task import Task

PageArray = npt.NDArray[np.int64]
_A = TypeVar("_A", bound=np.ndarray)

_U64 = (1 << 64) - 1
_PAGE_MASK_U64 = PAGE_MASK & _U64
_PFN40 = (1 << 40) - 1
_U64_PFN = np.uint64(_PFN40)
_U64_SHIFT = np.uint64(PAGE_SHIFT)
_UINT64 = np.dtype(np.uint64)
_NEED_R_INT = _PAGE_PRESENT | _PAGE_USER
_NEED_W_INT = _PAGE_PRESENT | _PAGE_USER | _PAGE_RW
_NEED_R = np.uint64(_PAGE_PRESENT | _PAGE_USER)
_NEED_W = np.uint64(_PAGE_PRESENT | _PAGE_USER | _PAGE_RW)
_U64_SPECIAL = np.uint64(_PAGE_SPECIAL)
_U64_RW = np.uint64(_PAGE_RW)
_U64_POISON = np.uint64(POISON)
_FREE = np.uint32(PG_buddy)
_NOT_LONGTERM_INT = PG_movable_zone | PG_reserved
"""Folios a FOLL_LONGTERM fast grab refuses: ZONE_MOVABLE (migrate first) and dax/devmap
frames (PG_reserved here), which the slow path then rejects or migrates."""
_NOT_LONGTERM = np.uint32(_NOT_LONGTERM_INT)
_ANON_OR_SHMEM_INT = PG_anon | PG_shmem
_ANON_OR_SHMEM = np.uint32(_ANON_OR_SHMEM_INT)
_PIN_LT_WRITE = FOLL_PIN | FOLL_LONGTERM | FOLL_WRITE
_ANON = np.uint32(PG_anon)
_ANON_EXCL = np.uint32(PG_anon_exclusive)
_REFERENCED = np.uint32(PG_referenced)
_ONE32 = np.int32(1)
_BIAS32 = np.int32(GUP_PIN_COUNTING_BIAS)
_PMD_ORDER = np.int64(HPAGE_PMD_ORDER)


# ---- reference bookkeeping (try_grab_folio_fast / gup_put_folio, vectorised) --------------------


def _mirror(kernel: Kernel, heads: PageArray, delta: int, pins: PageArray | None) -> None:
    """Record grabbed references in kernel.extra_refs/extra_pins (what try_grab_folio does).

    ``heads`` may repeat (one entry per page grabbed): ``np.add.at`` with a typed scalar.
    ``pins`` are large-folio heads, one per pin (_pincount +1 each).
    """
    np.add.at(kernel.extra_refs, heads, np.int32(delta))
    if pins is not None and len(pins):
        np.add.at(kernel.extra_pins, pins >> _PMD_ORDER, _ONE32)


def _unmirror(kernel: Kernel, heads: PageArray, delta: int, pins: PageArray | None) -> None:
    """Forget references recorded by :func:`_mirror` (the exact inverse, same arguments)."""
    np.subtract.at(kernel.extra_refs, heads, np.int32(delta))
    if pins is not None and len(pins):
        np.subtract.at(kernel.extra_pins, pins >> _PMD_ORDER, _ONE32)


def _grab(
    kernel: Kernel, pfns: PageArray, large: bool, pin: bool
) -> tuple[PageArray, PageArray, PageArray | None, PageArray]:
    """try_grab_folio_fast() for every page: ``(small_heads, large_heads, large_pins, heads)``.

    A small folio takes 1024 (PIN) or 1 (GET); a large folio takes 1 per page on its head,
    plus 1 on _pincount per page for PIN. Returns what :func:`_undo` needs.
    """
    mem = kernel.mem
    rc = mem.refcount
    if not large:
        np.add.at(rc, pfns, _BIAS32 if pin else _ONE32)
        _mirror(kernel, pfns, GUP_PIN_COUNTING_BIAS if pin else 1, None)
        return pfns, pfns[:0], None, pfns
    order = mem.order[pfns].astype(np.int64)
    heads = pfns & ~((np.int64(1) << order) - 1)
    big = order > 0
    small_h = heads[~big]
    large_h = heads[big]
    if len(small_h):
        np.add.at(rc, small_h, _BIAS32 if pin else _ONE32)
        _mirror(kernel, small_h, GUP_PIN_COUNTING_BIAS if pin else 1, None)
    np.add.at(rc, large_h, _ONE32)
    pins = None
    if pin:
        np.add.at(mem.large_pincount, large_h >> _PMD_ORDER, _ONE32)
        pins = large_h
    _mirror(kernel, large_h, 1, pins)
    return small_h, large_h, pins, heads


def _undo(
    kernel: Kernel, small_h: PageArray, large_h: PageArray, pins: PageArray | None, pin: bool
) -> None:
    """gup_put_folio() of speculative grabs whose entry changed; frees folios reaching zero."""
    mem = kernel.mem
    rc = mem.refcount
    if len(small_h):
        np.subtract.at(rc, small_h, _BIAS32 if pin else _ONE32)
        _unmirror(kernel, small_h, GUP_PIN_COUNTING_BIAS if pin else 1, None)
    if len(large_h):
        np.subtract.at(rc, large_h, _ONE32)
        if pins is not None:
            np.subtract.at(mem.large_pincount, pins >> _PMD_ORDER, _ONE32)
        _unmirror(kernel, large_h, 1, pins)
    heads = np.unique(np.concatenate((small_h, large_h)))
    mem.free_folios(heads[rc[heads] == 0])


# ---- the lockless walk ---------------------------------------------------------------------------


def _first_bad_pte(ptes: np.ndarray, need: np.uint64) -> int:
    """Index of the first PTE that is not present+user(+RW) or is special."""
    bad = ((ptes & need) != need) | ((ptes & _U64_SPECIAL) != 0)
    return int(bad.argmax())


def _check_poison(st: TlbState, ptes: np.ndarray) -> None:
    """Debug: a table read after a park holds the free poison → a detected use-after-free."""
    if (ptes == _U64_POISON).any():
        st.uaf_detected += 1
        raise PageTableUseAfterFree("GUP-fast walker read a page table freed under it")


Run = tuple[int, int, int, int]
"""One leaf-table stretch of a walk: ``(pmd_slot, pmd_value, first_pte_slot, npages)``."""


class _Consts:
    """Read-only arrays the walk slices instead of building them per call (grown on demand).

    ``step[i] == i << PAGE_SHIFT`` (uint64), ``bias[i] == 1024`` and ``one[i] == 1`` (int32:
    adding a same-dtype slice costs less than a scalar) for ``i < n``; ``pfn[p] == p`` (int64).
    """

    n: int
    step: npt.NDArray[np.uint64]
    bias: npt.NDArray[np.int32]
    one: npt.NDArray[np.int32]
    pfn: PageArray

    def __init__(self) -> None:
        self.grow(1024)
        self.grow_pfn(1 << 16)

    def grow(self, n: int) -> None:
        """Make ``step``, ``bias`` and ``one`` at least ``n`` long."""
        n = max(n, 2 * getattr(self, "n", 0))
        self.step = _frozen(np.arange(n, dtype=np.uint64) << np.uint64(PAGE_SHIFT))
        self.bias = _frozen(np.full(n, GUP_PIN_COUNTING_BIAS, dtype=np.int32))
        self.one = _frozen(np.ones(n, dtype=np.int32))
        self.n = n  # last: a walker on another thread never sees n before the arrays

    def grow_pfn(self, n: int) -> None:
        """Make ``pfn`` at least ``n`` long."""
        self.pfn = _frozen(np.arange(max(n, 2 * len(getattr(self, "pfn", ()))), dtype=np.int64))


def _frozen(a: _A) -> _A:
    """``a``, made read-only (views handed out can never write the cached array)."""
    a.flags.writeable = False
    return a


_C = _Consts()


def _first_changed(u: np.ndarray, runs: list[Run], ptes: np.ndarray, k: int) -> int:
    """The recheck, run by run: the first of the ``k`` grabbed entries to give back.

    "pmd changed" → that run's first entry; "pte changed" → that entry; ``k`` if none.
    """
    off = 0
    for pmdslot, pmd, base, rn in runs:
        if off >= k:
            break
        if u.item(pmdslot) != pmd:
            return off
        rn = min(rn, k - off)
        now = u[base : base + rn]
        if now.tobytes() != ptes[off : off + rn].tobytes():
            return off + int((now != ptes[off : off + rn]).argmax())
        off += rn
    return k


def _gup_pte_range(
    kernel: Kernel,
    st: TlbState,
    u: np.ndarray,
    runs: list[Run],
    flags: int,
    pages: PageArray,
    nr: int,
) -> int:
    """gup_fast_pte_range() over consecutive leaf tables at once; how many pages it took.

    The runs' PTEs are read once (one copy), checked, grabbed and rechecked as one array, so a
    range spanning two leaf tables costs one pass of numpy calls, not two. The first entry
    that fails any check ends the walk (the prefix before it is kept), exactly as a per-table
    walk would.

    The common case -- prefaulted small anon pages: contiguous pfns ``p0 … p0+n-1``, entries
    with equal bits, folios with equal flags, nothing to stop at -- is taken here with about
    ten numpy calls and no gather or scatter: when the first and last entries map pfns
    ``n - 1`` apart, entry ``i`` less ``i << PAGE_SHIFT`` equals entry 0 for every ``i`` iff
    that holds for the entries (the low 12 bits, the ones tested, are untouched), which is one
    bytes comparison; the folios' flags are a slice (one more); the grab and its mirror in
    ``kernel.extra_refs`` are slice additions; the recheck compares bytes. Anything else
    (scattered pfns, mixed bits or flags, a stop, large folios) goes to
    :func:`_gup_pte_general` with the same snapshot.
    """
    mem = kernel.mem
    hook = st.park_hook
    if hook is not None:
        for _s, pmd, base, n in runs:
            hook("pmd", (pmd & _PAGE_PFN_MASK) >> PAGE_SHIFT)
            _check_poison(st, u[base : base + n])
    # ptep_get_lockless() of each entry, once: an array (one run) or bytes (two, as a range
    # of up to 512 pages crosses at most one table boundary; the recheck compares bytes).
    nruns = len(runs)
    if nruns == 1:
        s1, q1, b1, n = runs[0]
        ptes = u[b1 : b1 + n].copy()
    elif nruns == 2:
        (s1, q1, b1, m1), (s2, q2, b2, m2) = runs
        sb = u[b1 : b1 + m1].tobytes() + u[b2 : b2 + m2].tobytes()
        ptes = np.frombuffer(sb, _UINT64)
        n = m1 + m2
    else:
        ptes = np.concatenate([u[b : b + m] for _s, _p, b, m in runs])
        n = len(ptes)
    e0 = ptes.item(0)
    p0 = (e0 >> PAGE_SHIFT) & _PFN40
    c = _C
    if ((ptes.item(-1) >> PAGE_SHIFT) & _PFN40) - p0 != n - 1:
        return _gup_pte_general(kernel, st, u, runs, flags, pages, nr, ptes)
    if n > c.n:
        c.grow(n)
    db = (ptes - c.step[:n]).tobytes()
    if db == db[:8] * n:  # entry i == e0 + (i << PAGE_SHIFT) for every i
        andv = orv = e0
    else:
        d = np.frombuffer(db, _UINT64)
        andv = int(np.bitwise_and.reduce(d))
        orv = int(np.bitwise_or.reduce(d))
    need = _NEED_W_INT if flags & FOLL_WRITE else _NEED_R_INT
    if (andv ^ orv) & _PAGE_PFN_MASK or andv & need != need or orv & _PAGE_SPECIAL:
        return _gup_pte_general(kernel, st, u, runs, flags, pages, nr, ptes)
    # n contiguous pfns p0 … p0+n-1, every entry present+user(+RW) and not special.
    fl = mem.flags[p0 : p0 + n]
    fb = fl.tobytes()
    if fb == fb[:4] * n:
        fl_or = fl_and = fl.item(0)
    else:
        fl_or = int(np.bitwise_or.reduce(fl))
        fl_and = int(np.bitwise_and.reduce(fl))
    pin = flags & FOLL_PIN
    if (
        fl_or & (PG_buddy | PG_head | PG_tail)
        or (flags & FOLL_LONGTERM and fl_or & _NOT_LONGTERM_INT)
        or (
            flags & _PIN_LT_WRITE == _PIN_LT_WRITE
            and (fl_or != fl_and or not fl_or & _ANON_OR_SHMEM_INT)
        )
        or (pin and not andv & _PAGE_RW and (fl_or != fl_and or _must_unshare(fl_or, flags)))
    ):
        return _gup_pte_general(kernel, st, u, runs, flags, pages, nr, ptes)
    # try_grab_folio_fast() of n distinct small folios, mirrored in extra_refs.
    add = c.bias[:n] if pin else c.one[:n]
    v = mem.refcount[p0 : p0 + n]
    v += add
    v = kernel.extra_refs[p0 : p0 + n]
    v += add
    if hook is not None:
        hook("grabbed", n)
    k = n
    if nruns == 1:
        same = u.item(s1) == q1 and u[b1 : b1 + n].tobytes() == ptes.tobytes()
    elif nruns == 2:
        same = (
            u.item(s1) == q1
            and u.item(s2) == q2
            and u[b1 : b1 + m1].tobytes() == sb[: m1 << 3]
            and u[b2 : b2 + m2].tobytes() == sb[m1 << 3 :]
        )
    else:
        same = False
    if not same:
        k = _first_changed(u, runs, ptes, n)
        if k != n:
            if p0 + n > len(c.pfn):
                c.grow_pfn(p0 + n)
            back = c.pfn[p0 + k : p0 + n]
            _undo(kernel, back, back[:0], None, bool(pin))
            if not k:
                return 0
    if not fl_and & PG_referenced:  # folio_set_referenced()
        fv = mem.flags[p0 : p0 + k]
        fv |= _REFERENCED
    if p0 + k > len(c.pfn):
        c.grow_pfn(p0 + k)
    pages[nr : nr + k] = c.pfn[p0 : p0 + k]
    return k


def _must_unshare(f: int, flags: int) -> bool:
    """gup_must_unshare(NULL, flags, page) for a R/O PTE, from the folio's flags."""
    if f & PG_anon:
        return not f & PG_anon_exclusive
    return bool(flags & FOLL_LONGTERM)


def _gup_pte_general(
    kernel: Kernel,
    st: TlbState,
    u: np.ndarray,
    runs: list[Run],
    flags: int,
    pages: PageArray,
    nr: int,
    ptes: np.ndarray,
) -> int:
    """:func:`_gup_pte_range` for any entries, given their snapshot ``ptes``.

    One reduction checks the entries (and of ``ptes ^ _PAGE_SPECIAL``: present+user[+RW] set
    and special clear everywhere), the pfns are shifted and masked in place, the folios'
    flags are one ``take()`` (equal flags: a bytes comparison instead of reductions), the
    prefix that passed is grabbed with ``np.add.at`` (a speculative ``try_grab_folio_fast``
    per page; a pfn may repeat), then the PMDs and entries are rechecked.
    """
    mem = kernel.mem
    hook = st.park_hook
    n = len(ptes)
    write = flags & FOLL_WRITE
    need = _NEED_W_INT if write else _NEED_R_INT
    k = n
    andv = int(np.bitwise_and.reduce(ptes ^ _U64_SPECIAL))
    if andv & need != need or not andv & _PAGE_SPECIAL:
        k = _first_bad_pte(ptes, _NEED_W if write else _NEED_R)
        if not k:
            return 0
        andv = int(np.bitwise_and.reduce(ptes[:k]))
    pfns_u = np.right_shift(ptes[:k], _U64_SHIFT)
    np.bitwise_and(pfns_u, _U64_PFN, out=pfns_u)
    pfns: PageArray = pfns_u.view(np.int64)
    fl = mem.flags.take(pfns)
    fb = fl.tobytes()
    same_fl = fb == fb[:4] * k
    fl_or = fl.item(0) if same_fl else int(np.bitwise_or.reduce(fl))
    pin = bool(flags & FOLL_PIN)
    stop = None
    if fl_or & PG_buddy:
        stop = (fl & _FREE) != 0  # refcount 0: folio_try_get() fails
    if flags & FOLL_LONGTERM and fl_or & _NOT_LONGTERM_INT:
        m = (fl & _NOT_LONGTERM) != 0  # !folio_is_longterm_pinnable(), devmap + LONGTERM
        stop = m if stop is None else stop | m
    if flags & _PIN_LT_WRITE == _PIN_LT_WRITE:
        # gup_fast_folio_allowed(): a writable long-term pin of a file folio needs dirty
        # tracking the pin would defeat; only anon and shmem pass (the slow path → EFAULT).
        f = (fl & _ANON_OR_SHMEM) == 0
        stop = f if stop is None else stop | f
    if pin and not write and not andv & _PAGE_RW:
        # !pte_write() && gup_must_unshare(NULL, flags, page)
        ro = (ptes[:k] & _U64_RW) == 0
        anon = (fl & _ANON) != 0
        must = ro & np.where(anon, (fl & _ANON_EXCL) == 0, bool(flags & FOLL_LONGTERM))
        stop = must if stop is None else stop | must
    if stop is not None and stop.any():
        k = int(stop.argmax())
        if not k:
            return 0
        pfns = pfns[:k]
        fl = fl[:k]
    large = bool(fl_or & (PG_head | PG_tail))
    if large:
        small_h, large_h, pins, heads = _grab(kernel, pfns, large, pin)
    else:  # _grab()'s small-folio case, inline, and _mirror() with the same typed scalar
        delta = _BIAS32 if pin else _ONE32
        np.add.at(mem.refcount, pfns, delta)
        np.add.at(kernel.extra_refs, pfns, delta)
        small_h = heads = pfns
        large_h = pfns[:0]
        pins = None
    if hook is not None:
        hook("grabbed", k)
    # Recheck: "pmd changed" or "pte changed" → put what we grabbed from there on, stop.
    j = k if k == n and _unchanged(u, runs, ptes) else _first_changed(u, runs, ptes, k)
    if j != k:
        if j == 0:
            _undo(kernel, small_h, large_h, pins, pin)
            return 0
        if large:
            big = mem.order[pfns[j:]] > 0
            h = heads[j:]
            _undo(kernel, h[~big], h[big], h[big] if pin else None, pin)
        else:
            _undo(kernel, pfns[j:], pfns[:0], None, pin)
        k = j
        pfns = pfns[:k]
        heads = heads[:k]
        fl = fl[:k]
    if not (fl_or if same_fl else int(np.bitwise_and.reduce(fl))) & PG_referenced:
        mem.flags[heads] |= _REFERENCED  # folio_set_referenced()
    pages[nr : nr + k] = pfns
    return k


def _unchanged(u: np.ndarray, runs: list[Run], ptes: np.ndarray) -> bool:
    """The recheck of every run's PMD and entries against the snapshot, as bytes."""
    if len(runs) == 1:
        pmdslot, pmd, base, rn = runs[0]
        return u.item(pmdslot) == pmd and u[base : base + rn].tobytes() == ptes.tobytes()
    sb = ptes.tobytes()
    off = 0
    for pmdslot, pmd, base, rn in runs:
        if u.item(pmdslot) != pmd or u[base : base + rn].tobytes() != sb[off : off + (rn << 3)]:
            return False
        off += rn << 3
    return True


def _gup_huge_pmd(
    kernel: Kernel,
    st: TlbState,
    u: np.ndarray,
    pmdslot: int,
    pmd: int,
    addr: int,
    end: int,
    flags: int,
    pages: PageArray,
    nr: int,
) -> int:
    """gup_fast_pmd_leaf(): all covered subpages of a PMD-mapped THP with one grab."""
    mem = kernel.mem
    need = _PAGE_PRESENT | _PAGE_USER | (_PAGE_RW if flags & FOLL_WRITE else 0)
    if pmd & need != need or pmd & _PAGE_SPECIAL:
        return 0
    head = (pmd & _PAGE_PFN_MASK) >> PAGE_SHIFT
    hook = st.park_hook
    if hook is not None:
        hook("huge", head)
    refs = (end - addr) >> PAGE_SHIFT
    f = int(mem.flags[head])
    if f & PG_buddy:
        return 0
    if flags & FOLL_LONGTERM and f & _NOT_LONGTERM_INT:
        return 0
    if flags & _PIN_LT_WRITE == _PIN_LT_WRITE and not f & _ANON_OR_SHMEM_INT:
        return 0  # gup_fast_folio_allowed()
    pin = bool(flags & FOLL_PIN)
    must_unshare = (not f & PG_anon_exclusive) if f & PG_anon else bool(flags & FOLL_LONGTERM)
    if pin and not flags & FOLL_WRITE and not pmd & _PAGE_RW and must_unshare:
        return 0  # gup_must_unshare(NULL, flags, &folio->page)
    # try_grab_folio_fast(page, refs): one atomic add for the whole folio.
    blk = head >> HPAGE_PMD_ORDER
    mem.refcount[head] += refs
    kernel.extra_refs[head] += refs
    if pin:
        mem.large_pincount[blk] += refs
        kernel.extra_pins[blk] += refs
    if hook is not None:
        hook("grabbed", refs)
    if u.item(pmdslot) != pmd:
        mem.refcount[head] -= refs
        kernel.extra_refs[head] -= refs
        if pin:
            mem.large_pincount[blk] -= refs
            kernel.extra_pins[blk] -= refs
        if mem.refcount[head] == 0:
            mem.free_huge(head)
        return 0
    mem.flags[head] |= PG_referenced
    first = head + ((addr & ~PMD_MASK) >> PAGE_SHIFT)
    pages[nr : nr + refs] = np.arange(first, first + refs, dtype=np.int64)  # record_subpages()
    return refs


def _gup_fast_walk(
    mm: MmStruct, st: TlbState, start: int, end: int, flags: int, pages: PageArray
) -> int:
    """gup_fast_pgd_range(): the walk proper, with IRQs already off; pages taken.

    The PGD and PUD entries are read once per PUD range (1 GiB) and the PMD entry once per
    2 MiB, as gup_fast_pud_range()/gup_fast_pmd_range() do; with a park hook installed (tests)
    the walk starts again from the PGD at every PMD, so a parked walker never reuses an upper
    table it read before the park. Consecutive PTE-table stretches are collected and handled
    together by :func:`_gup_pte_range`, PMD leaves one by one.
    """
    kernel = mm.kernel
    u = mm.mem.u64
    nr = 0
    addr = start
    runs: list[Run] = []
    pud_end = 0  # the PUD range whose PMD table starts at slot ``pmdt`` ends here
    pmdt = 0
    reuse = st.park_hook is None
    while addr < end:
        if addr >= pud_end:
            e = u.item(mm.pgd * PTRS_PER_TABLE + ((addr >> PGDIR_SHIFT) & 511))
            if not e & _PAGE_PRESENT:
                break
            e = u.item(((e >> PAGE_SHIFT) & _PFN40) * PTRS_PER_TABLE + ((addr >> PUD_SHIFT) & 511))
            if not e & _PAGE_PRESENT:
                break
            pmdt = ((e >> PAGE_SHIFT) & _PFN40) * PTRS_PER_TABLE
            pud_end = ((addr >> PUD_SHIFT) + 1) << PUD_SHIFT if reuse else 0
        pmdslot = pmdt + ((addr >> PMD_SHIFT) & 511)
        pmd = u.item(pmdslot)
        nxt = min(((addr >> PMD_SHIFT) + 1) << PMD_SHIFT, end)
        if pmd & (_PAGE_PSE | _PAGE_PRESENT) == _PAGE_PRESENT:  # a PTE table
            base = ((pmd >> PAGE_SHIFT) & _PFN40) * PTRS_PER_TABLE + ((addr >> PAGE_SHIFT) & 511)
            runs.append((pmdslot, pmd, base, (nxt - addr) >> PAGE_SHIFT))
        elif pmd & _PAGE_PSE:
            if runs:
                got = _gup_pte_range(kernel, st, u, runs, flags, pages, nr)
                nr += got
                if got != sum(r[3] for r in runs):
                    return nr
                runs = []
            got = _gup_huge_pmd(kernel, st, u, pmdslot, pmd, addr, nxt, flags, pages, nr)
            nr += got
            if got != (nxt - addr) >> PAGE_SHIFT:
                return nr
        else:
            break
        addr = nxt
    if runs:
        nr += _gup_pte_range(kernel, st, u, runs, flags, pages, nr)
    return nr


def gup_fast(mm: MmStruct, start: int, end: int, flags: int, pages: PageArray) -> int:
    """gup_fast(): the lockless walk of [start, end) with IRQs off; the number of pages taken.

    For FOLL_PIN it honours ``mm.write_protect_seq``: odd (fork is write-protecting) → 0; changed
    by the end of the walk → every pin of this pass is dropped and 0 returned. Synchronous by
    construction (no await = interrupts disabled); tests call it from a thread to park it.
    """
    kernel = mm.kernel
    if kernel.config.arch == "generic":
        return 0  # no CONFIG_HAVE_GUP_FAST
    pin = flags & FOLL_PIN
    seq = mm.write_protect_seq
    if pin and seq & 1:
        return 0
    st = tlb_state(kernel)
    st.irqs_off += 1  # local_irq_save()
    try:
        nr = _gup_fast_walk(mm, st, start, end, flags, pages)
    finally:
        st.local_irq_restore()
    if pin and nr and mm.write_protect_seq != seq:
        _unpin_pass(kernel, pages[:nr])
        return 0
    if nr:
        kernel.vmstat.count("fast_gup", nr)
        if pin:
            kernel.vmstat.count("nr_foll_pin_acquired", nr)
    return nr


def _unpin_pass(kernel: Kernel, pfns: PageArray) -> None:
    """gup_fast_unpin_user_pages(): drop every pin taken by a pass that raced with fork."""
    mem = kernel.mem
    order = mem.order[pfns].astype(np.int64)
    heads = pfns & ~((np.int64(1) << order) - 1)
    big = order > 0
    _undo(kernel, heads[~big], heads[big], heads[big], True)


# ---- entry points --------------------------------------------------------------------------------


def _fast_part(
    mm: MmStruct, start: int, nr_pages: int, gup_flags: int, pages: PageArray
) -> tuple[int, int, int]:
    """gup_fast_fallback() up to its slow path: ``(ret, start, nr_pages)``.

    The argument rules (flag whitelist → -EINVAL, MMF_HAS_PINNED for PIN, -EOVERFLOW,
    -EFAULT), then the lockless walk. ``start < 0``: ``ret`` is the final result (always so
    with FOLL_FAST_ONLY). Otherwise ``ret`` pages of the page-aligned ``[start, start +
    nr_pages pages)`` were taken and the rest needs :func:`_slow_part`. Synchronous, so the
    common (all-fast) case costs no coroutine.
    """
    if gup_flags & ~FOLL_FAST_ALLOWED:
        return -errno.EINVAL, -1, 0
    if gup_flags & FOLL_PIN:
        mm.flags |= MMF_HAS_PINNED  # mm_set_has_pinned_flag()
    start &= _PAGE_MASK_U64
    end = start + (((nr_pages & _U64) << PAGE_SHIFT) & _U64)
    if end > _U64:
        return -errno.EOVERFLOW, -1, 0
    if end > TASK_SIZE:
        return -errno.EFAULT, -1, 0
    if end == start:
        return 0, -1, 0
    nr_pinned = gup_fast(mm, start, end, gup_flags, pages)
    nr_pages = (end - start) >> PAGE_SHIFT
    if nr_pinned == nr_pages or gup_flags & FOLL_FAST_ONLY:
        return nr_pinned, -1, 0
    return nr_pinned, start, nr_pages


async def _slow_part(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    nr_pinned: int,
    gup_flags: int,
    pages: PageArray,
    current: Task | None,
) -> int:
    """gup_fast_fallback()'s slow path for what the lockless walk left (see :func:`_fast_part`)."""
    mm.kernel.vmstat.count("fast_gup_slow")
    ret = await __gup_longterm_locked(
        mm,
        start + (nr_pinned << PAGE_SHIFT),
        nr_pages - nr_pinned,
        pages[nr_pinned:],
        Locked(0),
        gup_flags | FOLL_TOUCH | FOLL_UNLOCKABLE,
        current=current,
    )
    if ret < 0:
        return nr_pinned if nr_pinned else ret
    return ret + nr_pinned


async def gup_fast_fallback(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    gup_flags: int,
    pages: PageArray,
    *,
    current: Task | None = None,
) -> int:
    """gup_fast_fallback(): the lockless walk, then the slow path for what it left."""
    ret, s, nr_pages = _fast_part(mm, start, nr_pages, gup_flags, pages)
    if s < 0:
        return ret
    return await _slow_part(mm, s, nr_pages, ret, gup_flags, pages, current)


def _valid(pages: PageArray | None, gup_flags: int, to_set: int) -> int | None:
    """is_valid_gup_args() → the flags to use, or None (stream A's valid_gup_flags)."""
    return valid_gup_flags(pages, None, gup_flags, to_set)


def get_user_pages_fast_only(
    mm: MmStruct, start: int, nr_pages: int, gup_flags: int, pages: PageArray
) -> int:
    """get_user_pages_fast_only(): FOLL_GET, lockless only (no sleep, no lock): 0..nr or -errno."""
    flags = _valid(pages, gup_flags, FOLL_GET | FOLL_FAST_ONLY)
    if flags is None:
        return -errno.EINVAL
    assert pages is not None
    return _fast_part(mm, start, nr_pages, flags, pages)[0]  # FOLL_FAST_ONLY: final


__get_user_pages_fast = get_user_pages_fast_only
"""__get_user_pages_fast() (seed 003, 2014): today's get_user_pages_fast_only()."""


async def get_user_pages_fast(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    gup_flags: int,
    pages: PageArray,
    *,
    current: Task | None = None,
) -> int:
    """get_user_pages_fast(): FOLL_GET references, lockless walk then the slow path."""
    flags = valid_gup_flags(pages, None, gup_flags, FOLL_GET)
    if flags is None:
        return -errno.EINVAL
    assert pages is not None
    ret, s, nr_pages = _fast_part(mm, start, nr_pages, flags, pages)
    if s < 0:
        return ret
    return await _slow_part(mm, s, nr_pages, ret, flags, pages, current)


async def pin_user_pages_fast(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    gup_flags: int,
    pages: PageArray,
    *,
    current: Task | None = None,
) -> int:
    """pin_user_pages_fast(): FOLL_PIN pins, lockless walk then the slow path.

    gup_fast_fallback() inline: the lockless part is a plain call, so a call the walk
    completes awaits nothing (no nested coroutine).
    """
    flags = valid_gup_flags(pages, None, gup_flags, FOLL_PIN)
    if flags is None:
        return -errno.EINVAL
    assert pages is not None
    ret, s, nr_pages = _fast_part(mm, start, nr_pages, flags, pages)
    if s < 0:
        return ret
    return await _slow_part(mm, s, nr_pages, ret, flags, pages, current)
