"""Compiled CPU kernels of few-shot evaluation: scikit-learn's lbfgs solve, Gram matrices, scoring.

:class:`~mmfsar.fewshot.LogisticRegressionClassifier` reduces every episode to a tiny problem
(S support features of S dimensions, N classes: 130 parameters for 5-way 5-shot) and replays
the solve of scikit-learn's ``LogisticRegression()`` on it, iteration for iteration. An
L-BFGS iteration on such a problem is a few thousand flops over a few kilobytes; run as
batched tensor ops over all episodes it costs ~300 operations each reading and writing
(E, 130) arrays, bound by per-operation overhead and memory traffic. Compiled (numba), each
episode's whole solve stays in L1 cache: several times faster on the CPU, and on a GPU
faster than hundreds of small kernel launches per iteration (the support features are moved
to the CPU, a few hundred kilobytes).

Scoring queries with per-episode linear heads (:func:`linear_head_probabilities`) reads each
query's features where they lie in the cache instead of gathering copies first.

Episodes are independent, so every kernel splits them over threads (the compiled functions
release the GIL); results do not depend on the split.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

__all__ = ["lbfgs_fit", "linear_head_probabilities", "support_gram"]

# Reassociation and contraction let reductions vectorise (round-off only); inf and NaN keep
# their meaning, which the line search relies on.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_EPS = float(np.finfo(np.float64).eps)
# L-BFGS-B's line search (MINPACK-2 dcsrch) parameters.
_FTOL, _GTOL, _XTOL, _STPMIN, _STPMAX = 1e-3, 0.9, 0.1, 0.0, 1e10
# exp by Cody–Waite reduction x = k·ln2 + r: the round-to-integer shifter and ln 2 in two parts.
_SHIFTER = 6755399441055744.0  # 1.5·2⁵²: x·log2(e) + shifter has k in its low mantissa bits
_SHIFTER_BITS = int(np.array([_SHIFTER]).view(np.int64)[0])
_LOG2E, _LN2_HI, _LN2_LO = 1.4426950408889634, 6.93147180369123816490e-01, 1.90821492927058770002e-10


@numba.njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
def _exp_nonpositive(x, bits):
    """x ← exp(x) in place for x ≤ 0 (1-D, contiguous; x < -708 gives exp(-708) ≈ 3e-308).

    The softmax's exponentials are most of an evaluation's time with libm's scalar ``exp``; as
    plain arithmetic (Cody–Waite reduction, Taylor polynomial of degree 13 on |r| ≤ ln2/2, the
    power of two built in the exponent bits) the loops vectorise, 6x faster, within 4 ulp of
    libm's. No reassociation here: it would fold the shifter's rounding away.
    """
    for i in range(x.shape[0]):
        v = max(x[i], -708.0)
        shifted = v * _LOG2E + _SHIFTER
        k = shifted - _SHIFTER
        r = (v - k * _LN2_HI) - k * _LN2_LO
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        x[i] = p * r + 1.0
        bits[i] = shifted
    power = bits.view(np.int64)
    for i in range(x.shape[0]):
        power[i] = (power[i] - _SHIFTER_BITS + 1023) << 52
    scale = power.view(np.float64)
    for i in range(x.shape[0]):
        x[i] *= scale[i]


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _dcstep(stx, fx, dx, sty, fy, dy, stp, fp, dp, brackt, stpmin, stpmax):
    """MINPACK-2 ``dcstep``: a safeguarded cubic/quadratic step and the new uncertainty interval.

    Returns (stx, fx, dx, sty, fy, dy, new step, brackt).
    """
    sgnd = dp * np.sign(dx)
    # The cubic through (stx, fx, dx) and (stp, fp, dp), used by the first three cases.
    theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
    s = max(abs(theta), abs(dx), abs(dp))
    gamma = s * math.sqrt(max((theta / s) ** 2 - (dx / s) * (dp / s), 0.0))
    if fp > fx:  # higher value: the minimum is bracketed
        if stp < stx:
            gamma = -gamma
        stpc = stx + (gamma - dx + theta) / (gamma - dx + gamma + dp) * (stp - stx)
        stpq = stx + dx / ((fx - fp) / (stp - stx) + dx) / 2.0 * (stp - stx)
        step = stpc if abs(stpc - stx) < abs(stpq - stx) else stpc + (stpq - stpc) / 2.0
    elif sgnd < 0:  # derivatives of opposite sign: bracketed
        if stp > stx:
            gamma = -gamma
        stpc = stp + (gamma - dp + theta) / (gamma - dp + gamma + dx) * (stx - stp)
        secant = stp + dp / (dp - dx) * (stx - stp)
        step = stpc if abs(stpc - stp) > abs(secant - stp) else secant
    elif abs(dp) < abs(dx):  # same sign, derivative decreases in magnitude
        if stp > stx:
            gamma = -gamma
        r = (gamma - dp + theta) / (gamma + (dx - dp) + gamma)
        if r < 0 and gamma != 0:
            stpc = stp + r * (stx - stp)
        elif stp > stx:
            stpc = stpmax
        else:
            stpc = stpmin
        secant = stp + dp / (dp - dx) * (stx - stp)
        if brackt:
            step = stpc if abs(stpc - stp) < abs(secant - stp) else secant
            limit = stp + 0.66 * (sty - stp)
            step = min(limit, step) if stp > stx else max(limit, step)
        else:
            step = stpc if abs(stpc - stp) > abs(secant - stp) else secant
            step = min(max(step, stpmin), stpmax)
    elif brackt:  # same sign, derivative does not decrease: cubic towards sty
        theta = 3.0 * (fp - fy) / (sty - stp) + dy + dp
        s = max(abs(theta), abs(dy), abs(dp))
        gamma = s * math.sqrt(max((theta / s) ** 2 - (dy / s) * (dp / s), 0.0))
        if stp > sty:
            gamma = -gamma
        step = stp + (gamma - dp + theta) / (gamma - dp + gamma + dy) * (sty - stp)
    else:
        step = stpmax if stp > stx else stpmin

    if fp > fx:
        sty, fy, dy = stp, fp, dp
    else:
        if sgnd < 0:
            sty, fy, dy = stx, fx, dx
        stx, fx, dx = stp, fp, dp
    return stx, fx, dx, sty, fy, dy, step, brackt or fp > fx or sgnd < 0


# The line search's state, one float64 vector (booleans as 0/1).
_STP, _STX, _FX, _GX, _STY, _FY, _GY, _STMIN, _STMAX, _WIDTH, _WIDTH1, _FINIT, _GINIT, _GTEST, _BRACKT, _STAGE2 = range(16)
LINE_SEARCH_STATE = 16


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def dcsrch_start(state, f0, g0, stp):
    """Start a Moré–Thuente search from f(0) = f0, f'(0) = g0 < 0 at first step ``stp``."""
    state[_STP] = stp
    state[_STX], state[_FX], state[_GX] = 0.0, f0, g0
    state[_STY], state[_FY], state[_GY] = 0.0, f0, g0
    state[_STMIN], state[_STMAX] = 0.0, 5.0 * stp
    state[_WIDTH] = _STPMAX - _STPMIN
    state[_WIDTH1] = 2.0 * state[_WIDTH]
    state[_FINIT], state[_GINIT], state[_GTEST] = f0, g0, _FTOL * g0
    state[_BRACKT], state[_STAGE2] = 0.0, 0.0


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def dcsrch(state, f, g):
    """One call of MINPACK-2 ``dcsrch`` with f and f' at ``state[0]``, the step just evaluated.

    Returns True when the search is over (converged, or one of its warnings, which L-BFGS-B
    also accepts); otherwise ``state[0]`` is the next step to evaluate.
    """
    stp, stx, sty = state[_STP], state[_STX], state[_STY]
    stmin, stmax, brackt = state[_STMIN], state[_STMAX], state[_BRACKT] != 0.0
    gtest = state[_GTEST]
    ftest = state[_FINIT] + stp * gtest
    lower = f <= ftest
    if lower and g >= 0:
        state[_STAGE2] = 1.0
    if lower and abs(g) <= _GTOL * (-state[_GINIT]):
        return True
    if brackt and (stp <= stmin or stp >= stmax or stmax - stmin <= _XTOL * stmax):
        return True
    if (stp == _STPMAX and lower and g <= gtest) or (stp == _STPMIN and (not lower or g >= gtest)):
        return True
    # First stage, lower but not sufficiently lower: step on the modified function.
    shift = gtest if (state[_STAGE2] == 0.0 and f <= state[_FX] and not lower) else 0.0
    stx, fx, gx, sty, fy, gy, stp, brackt = _dcstep(
        stx, state[_FX] - stx * shift, state[_GX] - shift,
        sty, state[_FY] - sty * shift, state[_GY] - shift,
        stp, f - stp * shift, g - shift, brackt, stmin, stmax,
    )  # fmt: skip
    state[_STX], state[_FX], state[_GX] = stx, fx + stx * shift, gx + shift
    state[_STY], state[_FY], state[_GY] = sty, fy + sty * shift, gy + shift
    if brackt:
        if abs(sty - stx) >= 0.66 * state[_WIDTH1]:
            stp = stx + 0.5 * (sty - stx)
        state[_WIDTH1] = state[_WIDTH]
        state[_WIDTH] = abs(sty - stx)
        stmin, stmax = min(stx, sty), max(stx, sty)
    else:
        stmin, stmax = stp + 1.1 * (stp - stx), stp + 4.0 * (stp - stx)
    stp = min(max(stp, _STPMIN), _STPMAX)
    if brackt and (stp <= stmin or stp >= stmax or stmax - stmin <= _XTOL * stmax):
        stp = stx
    state[_STP], state[_STMIN], state[_STMAX] = stp, stmin, stmax
    state[_BRACKT] = 1.0 if brackt else 0.0
    return False


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _evaluate(theta, logits, labels, penalty, residual, top, bits):
    """Scaled objective ``mean CE + ½·Σ penalty·θ²/S`` at theta; writes P - Y into residual
    (``top``, ``bits``: scratch of S and N·S)."""
    n_way, shots = logits.shape
    width = theta.shape[0] // n_way
    value = 0.0
    for n in range(n_way):
        for j in range(width - 1):
            value += theta[n * width + j] ** 2
    value *= 0.5 * penalty
    for s in range(shots):
        top[s] = logits[0, s]
    for n in range(1, n_way):
        for s in range(shots):
            top[s] = max(top[s], logits[n, s])
    for n in range(n_way):
        for s in range(shots):
            residual[n, s] = logits[n, s] - top[s]
    _exp_nonpositive(residual.reshape(-1), bits)
    for s in range(shots):
        total = 0.0
        for n in range(n_way):
            total += residual[n, s]
        value += math.log(total) + top[s] - logits[labels[s], s]
        inverse = 1.0 / total
        for n in range(n_way):
            residual[n, s] *= inverse
        residual[labels[s], s] -= 1.0
    return value / shots


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _gradient(theta, residual, z, lengths, penalty, out):
    """Gradient of the scaled objective: ((P - Y)·[Z, 1] + penalty·θ) / S, class-major.

    Row s of Z has its non-zeros in its first ``lengths[s]`` entries (a Cholesky factor is
    lower triangular).
    """
    n_way, shots = residual.shape
    rank = z.shape[1]
    width = rank + 1
    inverse = 1.0 / shots
    for n in range(n_way):
        base = n * width
        intercept = 0.0
        for j in range(rank):
            out[base + j] = penalty * theta[base + j]
        for s in range(shots):
            r = residual[n, s]
            intercept += r
            for j in range(lengths[s]):
                out[base + j] += r * z[s, j]
        for j in range(rank):
            out[base + j] *= inverse
        out[base + rank] = intercept * inverse


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _logits_along(direction, z, lengths, out):
    """out (N, S) = direction (class-major) · [Z, 1]ᵀ: the change of the logits per unit step."""
    n_way, shots = out.shape
    rank = z.shape[1]
    width = rank + 1
    for n in range(n_way):
        base = n * width
        for s in range(shots):
            a = direction[base + rank]
            for j in range(lengths[s]):
                a += direction[base + j] * z[s, j]
            out[n, s] = a


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _gradient_small(grad, n_way, tol, x, coef_map, use_basis, coefficients, mapped, column, probe):
    """scikit-learn's stopping test: the largest |gradient entry| <= tol in its coordinates.

    With the kernel reduction (``use_basis``) the weight part of the gradient is v (r dims) per
    class and the D-dim gradient is Q·v with Q = Xᵀ·M orthonormal. Bounds decide most calls
    cheaply: ‖v‖/√D <= ‖Q·v‖∞ <= min(‖v‖, max_i ‖x_i‖·‖M·v‖) (x_i: the i-th feature across
    the support; ``column[0]`` holds max_i ‖x_i‖², computed on first need, < 0 before), and
    ‖Q·v‖∞ >= |(Q·v)_i| at the coordinate ``probe[n]`` that was largest for class n the last
    time Q·v was formed (D·S per class), which is done only when all bounds fail.
    """
    width = grad.shape[0] // n_way
    for n in range(n_way):
        if abs(grad[n * width + width - 1]) > tol:
            return False
    if not use_basis:
        for n in range(n_way):
            for j in range(width - 1):
                if abs(grad[n * width + j]) > tol:
                    return False
        return True
    shots, dim = x.shape
    tol2 = tol * tol
    undecided = 0
    for n in range(n_way):
        v = grad[n * width : n * width + width - 1]
        norm2 = 0.0
        for j in range(width - 1):
            norm2 += v[j] * v[j]
        if norm2 > tol2 * dim:
            return False
        coefficients[n, :] = 0.0
        if norm2 > tol2:
            for s in range(shots):
                c = 0.0
                for j in range(width - 1):
                    c += coef_map[s, j] * v[j]
                coefficients[n, s] = c
            undecided += 1
    if undecided == 0:
        return True
    if column[0] < 0:
        mapped[:] = 0.0
        for s in range(shots):
            for i in range(dim):
                mapped[i] += np.float64(x[s, i]) * x[s, i]
        column[0] = mapped.max() * (1 + 1e-5)
    for n in range(n_way):
        c = coefficients[n]
        mapped_norm2, at_probe = 0.0, 0.0
        for s in range(shots):
            mapped_norm2 += c[s] * c[s]
            at_probe += c[s] * x[s, probe[n]]
        if mapped_norm2 * column[0] <= tol2:
            c[:] = 0.0
        elif abs(at_probe) > tol:
            return False
    for n in range(n_way):
        c = coefficients[n]
        if not c.any():
            continue
        mapped[:] = 0.0
        for s in range(shots):
            for i in range(dim):
                mapped[i] += c[s] * x[s, i]
        largest = 0
        for i in range(dim):
            if abs(mapped[i]) > abs(mapped[largest]):
                largest = i
        probe[n] = largest
        if abs(mapped[largest]) > tol:
            return False
    return True


def _workspace(n_way: int, shots: int, rank: int, dim: int, memory: int):
    """Scratch arrays of one thread's solves (allocated once per range of episodes)."""
    size = n_way * (rank + 1)
    return (
        np.empty(shots, dtype=np.int64),  # lengths
        np.empty(size), np.empty(size), np.empty(size), np.empty(size), np.empty(size), np.empty(size),
        np.empty((n_way, shots)), np.empty((n_way, shots)), np.empty((n_way, shots)),
        np.empty((n_way, shots)), np.empty((n_way, shots)),
        np.empty((memory, size)), np.empty((memory, size)), np.empty(memory), np.empty(memory),
        np.empty(LINE_SEARCH_STATE), np.zeros((n_way, shots)), np.empty(max(dim, 1)),
        np.empty(1), np.zeros(n_way, dtype=np.int64), np.empty(shots), np.empty(n_way * shots),
    )  # fmt: skip


_workspace = numba.njit(cache=True, nogil=True)(_workspace)


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _solve_one(ze, me, xe, label, n_way, penalty, max_iter, tol, use_basis, memory, max_line_search, work, out):
    """One episode's solve on reduced features ze (S, r): scikit-learn's lbfgs (SciPy's
    L-BFGS-B without bounds). Writes theta (N, r + 1) into ``out``; returns (converged, n_iter).
    """
    (
        lengths, theta, new_theta, grad, new_grad, direction, y_new, logits, new_logits, along,
        residual, new_residual, s_pairs, y_pairs, rho, alpha, search, coefficients, mapped, column, probe,
        top, bits,
    ) = work  # fmt: skip
    shots, rank = ze.shape
    width = rank + 1
    size = n_way * width
    for s in range(shots):
        lengths[s] = rank
        while lengths[s] > 0 and ze[s, lengths[s] - 1] == 0.0:
            lengths[s] -= 1
    column[0], probe[:] = -1.0, 0
    theta[:] = 0.0
    logits[:] = 0.0
    value = _evaluate(theta, logits, label, penalty, residual, top, bits)
    _gradient(theta, residual, ze, lengths, penalty, grad)
    converged = _gradient_small(grad, n_way, tol, xe, me, use_basis, coefficients, mapped, column, probe)
    running = not converged
    iterations, pairs, newest, inv_theta = 0, 0, -1, 1.0

    while running:
        # Two-loop recursion, newest pair first: direction = -H·g.
        for k in range(size):
            direction[k] = -grad[k]
        for p in range(pairs):
            i = (newest - p) % memory
            dot = 0.0
            for k in range(size):
                dot += s_pairs[i, k] * direction[k]
            alpha[i] = rho[i] * dot
            for k in range(size):
                direction[k] -= alpha[i] * y_pairs[i, k]
        if pairs > 0:
            for k in range(size):
                direction[k] *= inv_theta
        for p in range(pairs - 1, -1, -1):
            i = (newest - p) % memory
            dot = 0.0
            for k in range(size):
                dot += y_pairs[i, k] * direction[k]
            beta = rho[i] * dot
            for k in range(size):
                direction[k] += (alpha[i] - beta) * s_pairs[i, k]
        slope, norm2 = 0.0, 0.0
        for k in range(size):
            slope += grad[k] * direction[k]
            norm2 += direction[k] * direction[k]
        stp = 1.0 if iterations > 0 else min(1.0 / math.sqrt(norm2), _STPMAX)

        # Moré–Thuente line search (dcsrch, as L-BFGS-B's lnsrlb calls it). Logits are
        # linear along the direction, so trials need no product with the features.
        finished = False
        if slope < 0:
            _logits_along(direction, ze, lengths, along)
            penalised_dd, penalised_dt = 0.0, 0.0
            for n in range(n_way):
                for j in range(rank):
                    d = direction[n * width + j]
                    penalised_dd += d * d
                    penalised_dt += d * theta[n * width + j]
            dcsrch_start(search, value, slope, stp)
            for _ in range(max_line_search):
                stp = search[_STP]
                for k in range(size):
                    new_theta[k] = theta[k] + stp * direction[k]
                for n in range(n_way):
                    for s in range(shots):
                        new_logits[n, s] = logits[n, s] + stp * along[n, s]
                f = _evaluate(new_theta, new_logits, label, penalty, new_residual, top, bits)
                g = 0.0
                for n in range(n_way):
                    for s in range(shots):
                        g += new_residual[n, s] * along[n, s]
                g = (g + penalty * (penalised_dt + stp * penalised_dd)) / shots
                finished = dcsrch(search, f, g)
                if finished:
                    break

        if not finished:  # failed search: restart without memory, or stop if it had none
            if pairs == 0:
                iterations += 1
                break
            pairs, inv_theta = 0, 1.0
            continue

        iterations += 1
        _gradient(new_theta, new_residual, ze, lengths, penalty, new_grad)
        sy, yy = 0.0, 0.0
        for k in range(size):
            direction[k] *= stp  # s
            y_new[k] = new_grad[k] - grad[k]
            sy += direction[k] * y_new[k]
            yy += y_new[k] * y_new[k]
        accept = sy > _EPS * (-slope * stp)
        small_decrease = (value - f) <= 64 * _EPS * max(abs(value), abs(f), 1.0)
        value = f
        if accept:
            newest = (newest + 1) % memory
            s_pairs[newest, :] = direction
            y_pairs[newest, :] = y_new
            rho[newest] = 1.0 / sy
            inv_theta = sy / yy
            pairs = min(pairs + 1, memory)
        theta, new_theta = new_theta, theta
        logits, new_logits = new_logits, logits
        residual, new_residual = new_residual, residual
        grad, new_grad = new_grad, grad
        if iterations >= max_iter:
            break
        if small_decrease or _gradient_small(
            grad, n_way, tol, xe, me, use_basis, coefficients, mapped, column, probe
        ):
            converged = True
            break

    for n in range(n_way):
        for j in range(width):
            out[n, j] = theta[n * width + j]
    return converged, iterations


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _gram_one(xe, row, out):
    """out (S, S) = xe·xeᵀ in float64; row: (D,) scratch."""
    shots, dim = xe.shape
    for a in range(shots):
        for i in range(dim):
            row[i] = xe[a, i]
        for b in range(a + 1):
            xb = xe[b]
            total = 0.0
            for i in range(dim):
                total += row[i] * xb[i]
            out[a, b] = total
            out[b, a] = total


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _cholesky_reduction(gram, z, coef_map, inverse):
    """Z = L (Cholesky gram = L·Lᵀ) and M = L⁻ᵀ; False when the Gram matrix is singular or
    badly conditioned (smallest diagonal entry of L <= 1e-5 x its largest), as for
    ``torch.linalg.cholesky_ex`` in :func:`mmfsar.fewshot.classifiers._kernel_reduction`."""
    shots = gram.shape[0]
    z[:] = 0.0
    for j in range(shots):
        d = gram[j, j]
        for k in range(j):
            d -= z[j, k] * z[j, k]
        if not d > 0:
            return False
        z[j, j] = math.sqrt(d)
        for i in range(j + 1, shots):
            t = gram[i, j]
            for k in range(j):
                t -= z[i, k] * z[j, k]
            z[i, j] = t / z[j, j]
    smallest, largest = z[0, 0], z[0, 0]
    for j in range(shots):
        smallest, largest = min(smallest, z[j, j]), max(largest, z[j, j])
    if not smallest > 1e-5 * largest:
        return False
    inverse[:] = 0.0  # L⁻¹, lower triangular, row by row
    for i in range(shots):
        row = inverse[i]
        row[i] = 1.0
        for k in range(i):
            t = z[i, k]
            previous = inverse[k]
            for j in range(k + 1):
                row[j] -= t * previous[j]
        d = 1.0 / z[i, i]
        for j in range(i + 1):
            row[j] *= d
    for a in range(shots):
        for b in range(shots):
            coef_map[a, b] = inverse[b, a]
    return True


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _weights_one(xe, me, theta, use_basis, coefficients, total, weight, bias):
    """Episode weights in the original coordinates: W = (Xᵀ·M·B)ᵀ (or B), and intercepts.

    coefficients (N, S), total (D,): scratch.
    """
    n_way, width = theta.shape
    rank = width - 1
    shots, dim = xe.shape
    for n in range(n_way):
        bias[n] = theta[n, rank]
        if not use_basis:
            for i in range(dim):
                weight[n, i] = theta[n, i]
            continue
        for s in range(shots):
            c = 0.0
            for j in range(rank):
                c += me[s, j] * theta[n, j]
            coefficients[n, s] = c
        total[:] = 0.0
        for s in range(shots):
            c = coefficients[n, s]
            for i in range(dim):
                total[i] += c * xe[s, i]
        for i in range(dim):
            weight[n, i] = total[i]


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _fit_range(
    x, labels, n_way, penalty, max_iter, tol, memory, max_line_search,
    weight, bias, converged, iterations, reduced, start, stop,
):  # fmt: skip
    """Episodes [start, stop) from their support features: Gram matrix, Cholesky reduction,
    solve, weights. Episodes whose Gram matrix is ill-conditioned are left (reduced False)."""
    shots, dim = x.shape[1], x.shape[2]
    work = _workspace(n_way, shots, shots, dim, memory)
    gram, z = np.empty((shots, shots)), np.empty((shots, shots))
    coef_map, inverse = np.empty((shots, shots)), np.empty((shots, shots))
    theta = np.empty((n_way, shots + 1))
    row, coefficients = np.empty(dim), np.empty((n_way, shots))
    for e in range(start, stop):
        xe = x[e]
        _gram_one(xe, row, gram)
        reduced[e] = _cholesky_reduction(gram, z, coef_map, inverse)
        if not reduced[e]:
            continue
        converged[e], iterations[e] = _solve_one(
            z, coef_map, xe, labels[e], n_way, penalty, max_iter, tol, True, memory, max_line_search, work, theta
        )
        _weights_one(xe, coef_map, theta, True, coefficients, row, weight[e], bias[e])


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _solve_range(
    z, coef_map, x, labels, use_basis, n_way, penalty, max_iter, tol, memory, max_line_search,
    weight, bias, converged, iterations, start, stop,
):  # fmt: skip
    """Episodes [start, stop) on given reduced features (or the features themselves)."""
    shots, rank, dim = z.shape[1], z.shape[2], x.shape[2]
    work = _workspace(n_way, shots, rank, dim, memory)
    theta = np.empty((n_way, rank + 1))
    coefficients, total = np.empty((n_way, shots)), np.empty(dim)
    for e in range(start, stop):
        converged[e], iterations[e] = _solve_one(
            z[e], coef_map[e], x[e], labels[e], n_way, penalty, max_iter, tol, use_basis, memory,
            max_line_search, work, theta,
        )  # fmt: skip
        _weights_one(x[e], coef_map[e], theta, use_basis, coefficients, total, weight[e], bias[e])


def _split(function, episodes: int, threads: int, *args) -> None:
    """function(*args, start, stop) over [0, episodes), split in contiguous ranges over threads."""
    threads = max(1, min(int(threads), episodes // 16))
    if threads == 1:
        function(*args, 0, episodes)
        return
    bounds = np.linspace(0, episodes, threads + 1).astype(np.int64)
    with ThreadPoolExecutor(threads) as pool:
        jobs = [pool.submit(function, *args, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        for job in jobs:
            job.result()


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _gram_range(x, out, start, stop):
    row = np.empty(x.shape[2])
    for e in range(start, stop):
        _gram_one(x[e], row, out[e])


def support_gram(x: np.ndarray, *, threads: int = 1) -> np.ndarray:
    """X·Xᵀ (E, S, S) in float64 for support features x (E, S, D) of any float precision.

    Exact products of the features, accumulated in float64, one episode at a time (the
    episode's S×D block stays in cache; 2-3x faster here than batched float64 matmuls, which
    first need a float64 copy of the features).
    """
    x = np.ascontiguousarray(x)
    out = np.empty((x.shape[0], x.shape[1], x.shape[1]))
    _split(_gram_range, x.shape[0], threads, x, out)
    return out


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _score_range(source, positions, weight, bias, views, normalize, out, start, stop):
    n_way, dim = weight.shape[1], weight.shape[2]
    logits = np.empty(n_way)
    for e in range(start, stop):
        w, b = weight[e], bias[e]
        for m in range(positions.shape[1]):
            row = source[positions[e, m]]
            for n in range(n_way):
                out[e, m, n] = 0.0
            for v in range(views):
                q = row[v * dim : (v + 1) * dim]
                scale = 1.0
                if normalize:  # F.normalize: q / max(‖q‖, 1e-12)
                    norm2 = 0.0
                    for i in range(dim):
                        norm2 += np.float64(q[i]) * q[i]
                    scale = 1.0 / max(math.sqrt(norm2), 1e-12)
                top = -np.inf
                for n in range(n_way):
                    wn = w[n]
                    total = q[0] - q[0]  # zero in the features' precision
                    for i in range(dim):
                        total += q[i] * wn[i]
                    logits[n] = total * scale + b[n]
                    top = max(top, logits[n])
                normaliser = 0.0
                for n in range(n_way):
                    logits[n] = math.exp(logits[n] - top)
                    normaliser += logits[n]
                for n in range(n_way):
                    out[e, m, n] += logits[n] / normaliser / views


def linear_head_probabilities(
    source: np.ndarray,
    positions: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    views: int = 1,
    normalize: bool = False,
    threads: int = 1,
) -> np.ndarray:
    """Class probabilities of queries scored by per-episode linear heads, averaged over views.

    source (clips, V·D): every clip's V query views side by side; positions (E, M): the rows
    of episode e's M queries; weight (E, N, D), bias (E, N): episode e's head
    (softmax(q·Wᵀ + b), with q L2-normalised first when ``normalize``). Products accumulate in
    the features' precision (exact enough for the argmax). Returns (E, M, N) in ``source``'s
    dtype; ``weight`` must have it too.
    """
    source = np.ascontiguousarray(source)
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    weight = np.ascontiguousarray(weight)
    bias = np.ascontiguousarray(bias, dtype=np.float64)
    out = np.empty(positions.shape + (weight.shape[1],), dtype=source.dtype)
    _split(_score_range, positions.shape[0], threads, source, positions, weight, bias, int(views), bool(normalize), out)
    return out




def lbfgs_fit(
    support: np.ndarray,
    labels: np.ndarray,
    n_way: int,
    *,
    reduction: tuple[np.ndarray, np.ndarray | None] | None = None,
    C: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-4,
    memory: int = 10,
    max_line_search: int = 50,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's ``LogisticRegression(C=C, tol=tol, max_iter=max_iter).fit`` for E episodes.

    support (E, S, D) float32 or float64, labels (E, S) in [0, n_way). By default (S < D) each
    episode is reduced to S dimensions by the Cholesky factor of its Gram matrix (see
    :class:`~mmfsar.fewshot.LogisticRegressionClassifier`), solved, and mapped back; episodes
    whose Gram matrix is singular or badly conditioned (repeated clips) are left unsolved and
    flagged. ``reduction=(features, coef_map)`` gives the reduced features (E, S, r) and their
    map (E, S, r) (Q = Xᵀ·M orthonormal) instead, e.g. from an eigendecomposition, or, with
    ``coef_map=None``, solves on ``features`` = the support in float64 itself. ``threads``:
    episodes are split over this many threads.

    Returns weight (E, N, D) in the support's dtype, bias (E, N), converged (E,), iterations
    (E,) (scikit-learn's ``n_iter_``) and solved (E,) (False: left for another reduction).

    The algorithm of scikit-learn's ``solver="lbfgs"``, i.e. SciPy's L-BFGS-B without bounds,
    step for step: the scaled objective ``mean CE + ‖W‖²/(2·C·S)`` from zero; L-BFGS
    directions from the last ``memory`` correction pairs (a pair is skipped when
    s·y <= eps·(-s·g)); the Moré–Thuente line search (ftol 1e-3, gtol 0.9, xtol 0.1, first step
    1/‖d‖, then 1; at most ``max_line_search`` evaluations, after which the memory is dropped
    and the iteration restarted, or the solve stops if it had none); and the stopping rules:
    largest gradient entry <= ``tol`` in the original coordinates, relative decrease of the
    objective <= 64·eps, or ``max_iter`` iterations.
    """
    support = np.ascontiguousarray(support)
    episodes, shots, dim = support.shape
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    weight, bias, converged, iterations = outputs = (
        np.zeros((episodes, n_way, dim), dtype=support.dtype),
        np.zeros((episodes, n_way)),
        np.zeros(episodes, dtype=np.bool_),
        np.zeros(episodes, dtype=np.int64),
    )
    options = (1.0 / C, int(max_iter), float(tol), int(memory), int(max_line_search))
    if reduction is None:
        if shots >= dim:
            raise ValueError(f"the kernel reduction needs fewer support clips than dimensions, got {shots} >= {dim}")
        solved = np.zeros(episodes, dtype=np.bool_)
        _split(_fit_range, episodes, threads, support, labels, n_way, *options, *outputs, solved)
        return weight, bias, converged, iterations, solved
    features, coef_map = reduction
    features = np.ascontiguousarray(features, dtype=np.float64)
    use_basis = coef_map is not None
    coef_map = np.ascontiguousarray(coef_map, dtype=np.float64) if use_basis else np.zeros((episodes, 1, 1))
    _split(_solve_range, episodes, threads, features, coef_map, support, labels, use_basis, n_way, *options, *outputs)
    return weight, bias, converged, iterations, np.ones(episodes, dtype=np.bool_)

