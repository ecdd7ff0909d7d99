/* Asymmetric uniform quantization of token rows on the CPU, bit-identical to UniformCodec.encode's torch ops
 * (lmcompress/kv/quant/uniform.py) for per-token channel groups: per group zero = fp16_down(min), scale =
 * fp16_up((max - zero) / qmax) (1 where that is 0), code = floor((x - zero) / scale + 0.5) clamped to [0, qmax],
 * codes packed along the channels (channel c in byte c / (8 / bits) at bit (c % (8 / bits)) * bits).
 *
 * Compiled WITHOUT fast-math and with -ffp-contract=off: every float operation rounds as torch's do.
 *   x [rows][D] float32 (contiguous), codes [rows][D * bits / 8], scale/zero [rows][D / group] fp16 bits.
 * Returns 0, or 2 when x holds a non-finite value or one beyond +-32752 (the caller raises the library's error).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t half_bits(_Float16 h) {
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

static inline _Float16 bits_half(uint16_t u) {
    _Float16 h;
    memcpy(&h, &u, 2);
    return h;
}

/* the next fp16 value after h toward -inf (down) or +inf (up); h finite */
static inline _Float16 half_step(_Float16 h, int up) {
    uint16_t u = half_bits(h);
    if ((u & 0x7fff) == 0) return bits_half(up ? 0x0001 : 0x8001);
    const int negative = u >> 15;
    if (negative == up) u -= 1; else u += 1;
    return bits_half(u);
}

static inline _Float16 fp16_down(float x) {
    _Float16 h = (_Float16)x;
    return (float)h > x ? half_step(h, 0) : h;
}

static inline _Float16 fp16_up(float x) {
    _Float16 h = (_Float16)x;
    return (float)h < x ? half_step(h, 1) : h;
}

int lmc_encode_affine(const float *x, long rows, int D, int group, int bits, uint8_t *codes, uint16_t *scale,
                      uint16_t *zero) {
    const int per = 8 / bits, ng = D / group, qmax = (1 << bits) - 1, pbytes = D / per;
    for (long i = 0; i < (long)rows * D; i++)
        if (!isfinite(x[i]) || fabsf(x[i]) > 32752.0f) return 2;
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * D;
        uint8_t *cr = codes + r * pbytes;
        memset(cr, 0, pbytes);
        for (int k = 0; k < ng; k++) {
            float lo = xr[k * group], hi = lo;
            for (int c = k * group + 1; c < (k + 1) * group; c++) {
                lo = xr[c] < lo ? xr[c] : lo;
                hi = xr[c] > hi ? xr[c] : hi;
            }
            _Float16 z = fp16_down(lo);
            float zf = (float)z;
            _Float16 s = fp16_up((hi - zf) / (float)qmax);
            if (!((float)s > 0.0f)) s = (_Float16)1.0f;
            const float sf = (float)s;
            scale[r * ng + k] = half_bits(s);
            zero[r * ng + k] = half_bits(z);
            for (int c = k * group; c < (k + 1) * group; c++) {
                float v = floorf((xr[c] - zf) / sf + 0.5f);
                v = v < 0.0f ? 0.0f : (v > (float)qmax ? (float)qmax : v);
                cr[c / per] |= (uint8_t)((unsigned)v << ((c % per) * bits));
            }
        }
    }
    return 0;
}
