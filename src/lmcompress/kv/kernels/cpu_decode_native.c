/* Decode attention of one query token over packed affine codes, fused in one loop per KV head (CPU).
 *
 * The arithmetic of lmcompress/kv/kernels/cpu_decode.py (scores and value sums from the integer codes, scales
 * and zero points folded in per group, one softmax over the packed and the full-precision tokens), without
 * temporaries: each token's codes are unpacked into a D-float register block and used at once.
 *
 * Layout (all strides in elements of the pointed type; one "row" = one (batch, KV head)):
 *   q        [rows, G, D] float32 (already rotated for rotated formats)
 *   packed keys, mode 0 (per token, groups of kgs channels): codes [rows][n][P] uint8, scale/zero [rows][n][D/kgs]
 *   packed keys, mode 1 (per channel, blocks of ktb tokens): codes [rows][n/ktb][ktb][P], scale/zero
 *            [rows][n/ktb][D]
 *   packed values (per token, groups of vgs channels): codes [rows][vp][P], scale/zero [rows][vp][D/vgs]
 *   fk [rows][m][D], fv [rows][n + m - vp][D] float32: the full-precision keys after the packed ones and the
 *            full-precision values after the packed ones
 *   out [rows, G, D] float32; work [rows, G, n + m] float32 scratch
 * Codes: channel c of a token sits in byte c / (8 / bits) at bit (c % (8 / bits)) * bits (bits 2, 4 or 8).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAXD 256
#define MAXG 64

/* Plane layout: with per = 8 / bits codes a byte, plane s holds channels s, s + per, s + 2 per, ... so that byte j
 * of a token gives entry j of every plane: x_plane[s * P + j] = x[j * per + s] (P = D / per bytes a token). */
static inline void to_planes(const float *x, int d, int per, float *out) {
    const int p = d / per;
    for (int s = 0; s < per; s++)
        for (int j = 0; j < p; j++) out[s * p + j] = x[j * per + s];
}

static inline void from_planes(const float *x, int d, int per, float *out) {
    const int p = d / per;
    for (int s = 0; s < per; s++)
        for (int j = 0; j < p; j++) out[j * per + s] = x[s * p + j];
}

typedef float v8f __attribute__((vector_size(32)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* 8 codes (plane ``shift / bits`` of 8 bytes) as floats: widened to int32 first, so that the shift, the mask and
 * the conversion are whole-vector instructions (a direct uint8 -> float conversion is scalarised by GCC 12) */
static inline v8f codes8(const uint8_t *src, int shift, unsigned mask) {
    v8u8 b;
    memcpy(&b, src, 8);
    v8i w = __builtin_convertvector(b, v8i);
    return __builtin_convertvector((w >> shift) & (int32_t)mask, v8f);
}

static inline v8f load8(const float *x) {
    v8f v;
    memcpy(&v, x, sizeof v);
    return v;
}

static inline float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* exp(x) of 8 lanes for x <= 0 (the softmax's shifted scores): Cephes' single-precision range reduction and
 * polynomial (relative error ~2e-7), 0 below -87.3. glibc's vector expf is used only under -ffast-math, which
 * would also assume no infinities; this keeps the build's float semantics otherwise strict. */
static inline v8f exp8_nonpositive(v8f x) {
    const v8f log2e = {1.44269504088896341f, 1.44269504088896341f, 1.44269504088896341f, 1.44269504088896341f,
                       1.44269504088896341f, 1.44269504088896341f, 1.44269504088896341f, 1.44269504088896341f};
    v8i under = x < -87.3f;
    v8f y = x * log2e - 0.5f;                   /* y <= -0.5: truncation toward zero rounds to nearest */
    v8i n = __builtin_convertvector(y, v8i);
    v8f nf = __builtin_convertvector(n, v8f);
    v8f r = x - nf * 0.693359375f;              /* ln 2 in two parts */
    r = r - nf * -2.12194440e-4f;
    v8f p = r * 1.9875691500e-4f;
    p = p + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    v8i bits = (n + 127) << 23;
    v8f scale;
    memcpy(&scale, &bits, sizeof scale);
    v8f out = p * scale;
    v8i ob;
    memcpy(&ob, &out, sizeof ob);
    ob &= ~under;
    memcpy(&out, &ob, sizeof out);
    return out;
}

/* a token's P bytes of codes -> float planes buf[s * P + j] = code_s(byte j) (P a multiple of 8) */
static inline void unpack_planes(const uint8_t *codes, int p, int per, int bits, float *buf) {
    const unsigned mask = (1u << bits) - 1u;
    if (p % 8 == 0) {
        for (int j = 0; j < p; j += 8)
            for (int s = 0; s < per; s++) {
                v8f c = codes8(codes + j, s * bits, mask);
                memcpy(buf + s * p + j, &c, sizeof c);
            }
        return;
    }
    for (int j = 0; j < p; j++)
        for (int s = 0; s < per; s++) buf[s * p + j] = (float)((codes[j] >> (s * bits)) & mask);
}

/* sum over bytes [j0, j1) and every plane of a[s][j] * b[s][j] (planes of p entries) */
static inline float dot_planes(const float *a, const float *b, int p, int per, int j0, int j1) {
    if ((j1 - j0) % 8 == 0) {
        v8f acc = {0};
        for (int s = 0; s < per; s++)
            for (int j = j0; j < j1; j += 8) acc += load8(a + s * p + j) * load8(b + s * p + j);
        return hsum8(acc);
    }
    float acc = 0.f;
    for (int s = 0; s < per; s++)
        for (int j = j0; j < j1; j++) acc += a[s * p + j] * b[s * p + j];
    return acc;
}

/* acc[s][j] += w * x[s][j] + bz over bytes [j0, j1) and every plane */
static inline void axpy_planes(const float *x, float *acc, int p, int per, int j0, int j1, float w, float bz) {
    for (int s = 0; s < per; s++)
        for (int j = j0; j < j1; j++) acc[s * p + j] += w * x[s * p + j] + bz;
}

int lmc_decode_attention(
    int rows, int G, int D, const float *q, float scaling,
    int n, int key_mode, int kbits, int kgroup,
    const uint8_t *kcodes, long kc_row, long kc_tok,
    const float *kscale, const float *kzero, long ks_row, long ks_tok,
    int vp, int vbits, int vgs,
    const uint8_t *vcodes, long vc_row, long vc_tok,
    const float *vscale, const float *vzero, long vs_row, long vs_tok,
    int m, const float *fk, long fk_row, long fk_tok,
    const float *fv, long fv_row, long fv_tok,
    float *out, float *work) {
    const int kper = 8 / kbits, vper = 8 / vbits;
    if (D > MAXD || G > MAXG || D % kper || D % vper || kgroup % kper || vgs % vper) return 1;
    if (key_mode == 0 && G * (D / kgroup) > MAXG * 16) return 1;
    const int total = n + m;
    const int kp = D / kper, vpb = D / vper; /* bytes a token */
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        float qp[MAXG * MAXD];  /* the queries in the key codes' plane layout */
        const float *qr = q + (long)r * G * D;
        float *sc = work + (long)r * G * total;
        for (int g = 0; g < G; g++) to_planes(qr + g * D, D, kper, qp + g * D);
        /* ---- scores of the packed keys */
        if (key_mode == 0) {  /* per token: x = s_tk c + z_tk on channel group k */
            const int ng = D / kgroup, gb = kgroup / kper; /* groups, bytes a group */
            float qsum[MAXG * 16];
            for (int g = 0; g < G; g++)
                for (int k = 0; k < ng; k++) {
                    float a = 0.f;
                    for (int c = k * kgroup; c < (k + 1) * kgroup; c++) a += qr[g * D + c];
                    qsum[g * ng + k] = a;
                }
            float buf[MAXD];
            for (int t = 0; t < n; t++) {
                unpack_planes(kcodes + r * kc_row + t * kc_tok, kp, kper, kbits, buf);
                const float *s_t = kscale + r * ks_row + t * ks_tok, *z_t = kzero + r * ks_row + t * ks_tok;
                for (int g = 0; g < G; g++) {
                    float acc = 0.f;
                    for (int k = 0; k < ng; k++) acc += z_t[k] * qsum[g * ng + k];
                    if (gb % 8 == 0) {  /* scale each group's lanes, then one horizontal sum per query head */
                        v8f lanes = {0};
                        for (int k = 0; k < ng; k++) {
                            v8f part = {0};
                            for (int sp = 0; sp < kper; sp++)
                                for (int j = k * gb; j < (k + 1) * gb; j += 8)
                                    part += load8(qp + g * D + sp * kp + j) * load8(buf + sp * kp + j);
                            lanes += part * s_t[k];
                        }
                        acc += hsum8(lanes);
                    } else {
                        for (int k = 0; k < ng; k++)
                            acc += s_t[k] * dot_planes(buf, qp + g * D, kp, kper, k * gb, (k + 1) * gb);
                    }
                    sc[g * total + t] = acc * scaling;
                }
            }
        } else {  /* per channel over blocks of tb tokens: q . k_t = (q * s_b) . c_t + q . z_b */
            const int tb = kgroup;
            float qs[MAXG * MAXD], tmp[MAXD], bias[MAXG];
            for (int b0 = 0; b0 < n; b0 += tb) {
                const long blk = b0 / tb;
                const float *s_b = kscale + r * ks_row + blk * ks_tok, *z_b = kzero + r * ks_row + blk * ks_tok;
                for (int g = 0; g < G; g++) {
                    float z = 0.f;
                    for (int c = 0; c < D; c++) {
                        tmp[c] = qr[g * D + c] * s_b[c];
                        z += qr[g * D + c] * z_b[c];
                    }
                    to_planes(tmp, D, kper, qs + g * D);
                    bias[g] = z;
                }
                const int e = b0 + tb < n ? b0 + tb : n;
                for (int t = b0; t < e; t++) {
                    unpack_planes(kcodes + r * kc_row + blk * (long)tb * kc_tok + (t - b0) * kc_tok, kp, kper, kbits,
                                  tmp);
                    for (int g = 0; g < G; g++)
                        sc[g * total + t] = (dot_planes(tmp, qs + g * D, kp, kper, 0, kp) + bias[g]) * scaling;
                }
            }
        }
        /* ---- scores of the full-precision keys */
        for (int t = 0; t < m; t++) {
            const float *k = fk + r * fk_row + t * fk_tok;
            for (int g = 0; g < G; g++) {
                float dot = 0.f;
                for (int c = 0; c < D; c++) dot += qr[g * D + c] * k[c];
                sc[g * total + n + t] = dot * scaling;
            }
        }
        /* ---- softmax per query head */
        for (int g = 0; g < G; g++) {
            float *s = sc + g * total;
            float mx = s[0];
            for (int t = 1; t < total; t++) mx = s[t] > mx ? s[t] : mx;
            float sum = 0.f;
            int t = 0;
            v8f vsum = {0};
            for (; t + 8 <= total; t += 8) {
                v8f e = exp8_nonpositive(load8(s + t) - mx);
                memcpy(s + t, &e, sizeof e);
                vsum += e;
            }
            sum = hsum8(vsum);
            for (; t < total; t++) {
                s[t] = expf(s[t] - mx);
                sum += s[t];
            }
            const float inv = 1.f / sum;
            for (int t = 0; t < total; t++) s[t] *= inv;
        }
        /* ---- value sums: packed values (accumulated in the value codes' plane layout), then full precision */
        float accp[MAXG * MAXD];
        memset(accp, 0, sizeof(float) * G * D);
        const int ngv = D / vgs, gbv = vgs / vper;
        float vbuf[MAXD];
        for (int t = 0; t < vp; t++) {
            unpack_planes(vcodes + r * vc_row + t * vc_tok, vpb, vper, vbits, vbuf);
            const float *s_t = vscale + r * vs_row + t * vs_tok, *z_t = vzero + r * vs_row + t * vs_tok;
            for (int g = 0; g < G; g++) {
                const float pr = sc[g * total + t];
                for (int k = 0; k < ngv; k++)
                    axpy_planes(vbuf, accp + g * D, vpb, vper, k * gbv, (k + 1) * gbv, pr * s_t[k], pr * z_t[k]);
            }
        }
        float *o = out + (long)r * G * D;
        for (int g = 0; g < G; g++) from_planes(accp + g * D, D, vper, o + g * D);
        for (int t = vp; t < total; t++) {
            const float *v = fv + r * fv_row + (t - vp) * fv_tok;
            for (int g = 0; g < G; g++) {
                const float pr = sc[g * total + t];
                float *og = o + g * D;
                for (int c = 0; c < D; c++) og[c] += pr * v[c];
            }
        }
    }
    return 0;
}
