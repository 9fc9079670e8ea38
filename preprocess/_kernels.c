/*
 * preprocess._kernels: the two loops of the fast paths that numpy cannot do in one pass.
 *
 * resample(): Pillow's 8-bit resampling (src/libImaging/Resample.c, Pillow 10-13), bit for bit.
 *   Pillow resizes in two separable passes of fixed-point integer arithmetic: coefficients are
 *   computed in double, normalised per output pixel, rounded to int32 with 22 fractional bits
 *   (PRECISION_BITS), and each output is (sum of pixel * coefficient + 2^21) >> 22, clipped to
 *   0..255; the horizontal pass writes an 8-bit intermediate that the vertical pass reads. The
 *   coefficient code below is Pillow's, expression for expression (and this file is compiled with
 *   -ffp-contract=off, as Pillow's plain-x86-64 wheels effectively are: no fused multiply-add), so
 *   the integer coefficients are Pillow's; the sums are integer, so their order is free, and the
 *   AVX2 loops add the same products in a different order for 8 lanes at once. That is where the
 *   speed comes from: Pillow's loops are scalar, one channel of one pixel per multiply.
 *   The layout is Pillow's own for RGB: 4 bytes per pixel (R, G, B, pad), so the source can be the
 *   decoded image's memory itself (an Arrow export of it, no copy) and 4 channels fill an SSE lane.
 *
 * patchify(): Qwen2-VL's patch order from the resized 4-byte pixels, each value mapped through a
 *   per-channel 256-entry table (the processor's own rescale + normalize results: float32 bits,
 *   bfloat16 bits, or identity bytes for uint8 transport) and each patch's frame written
 *   temporal_patch_size times, straight into the destination (the request's arena extent).
 *
 * preprocess/kernels.py is the Python face (argument checks, the Arrow or tobytes source, the
 * self-check against PIL); preprocess/fastpath*.py call it and prove their outputs against the
 * transformers processors as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define MM_X86 1
#else
#define MM_X86 0
#endif

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

#define PRECISION_BITS (32 - 8 - 2)

/* ---- Pillow's filters (Resample.c), unchanged ------------------------------------------------ */

static inline double
box_filter(double x) {
    if (x > -0.5 && x <= 0.5) {
        return 1.0;
    }
    return 0.0;
}

static inline double
bilinear_filter(double x) {
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return 1.0 - x;
    }
    return 0.0;
}

static inline double
hamming_filter(double x) {
    if (x < 0.0) {
        x = -x;
    }
    if (x == 0.0) {
        return 1.0;
    }
    if (x >= 1.0) {
        return 0.0;
    }
    x = x * M_PI;
    return sin(x) / x * (0.54f + 0.46f * cos(x));
}

static inline double
bicubic_filter(double x) {
#define a -0.5
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * a;
    }
    return 0.0;
#undef a
}

static inline double
sinc_filter(double x) {
    if (x == 0.0) {
        return 1.0;
    }
    x = x * M_PI;
    return sin(x) / x;
}

static inline double
lanczos_filter(double x) {
    if (-3.0 <= x && x < 3.0) {
        return sinc_filter(x) * sinc_filter(x / 3);
    }
    return 0.0;
}

struct filter {
    double (*filter)(double x);
    double support;
};

/* Indexed by PIL's Image.Resampling values; NEAREST (0) is not a convolution: PIL's own call. */
static const struct filter FILTERS[6] = {
    {NULL, 0.0},
    {lanczos_filter, 3.0},  /* LANCZOS = 1 */
    {bilinear_filter, 1.0}, /* BILINEAR = 2 */
    {bicubic_filter, 2.0},  /* BICUBIC = 3 */
    {box_filter, 0.5},      /* BOX = 4 */
    {hamming_filter, 1.0},  /* HAMMING = 5 */
};

/* ---- coefficients: Pillow's precompute_coeffs + normalize_coeffs_8bpc ------------------------ */

typedef struct {
    int ksize;
    int *bounds;  /* (xmin, count) per output pixel */
    int32_t *kk;  /* ksize per output pixel, zero past count */
} coeffs;

static void
coeffs_free(coeffs *c) {
    free(c->bounds);
    free(c->kk);
    c->bounds = NULL;
    c->kk = NULL;
}

/* 0 on success, -1 on allocation failure or a size Pillow itself refuses. */
static int
coeffs_make(coeffs *c, int inSize, float in0, float in1, int outSize, const struct filter *filterp) {
    double support, scale, filterscale;
    int xx, x, ksize, xmin, xmax;
    double *kk, *k;

    c->bounds = NULL;
    c->kk = NULL;
    filterscale = scale = (double)(in1 - in0) / outSize;
    if (filterscale < 1.0) {
        filterscale = 1.0;
    }
    support = filterp->support * filterscale;
    ksize = (int)ceil(support) * 2 + 1;
    if (outSize > INT_MAX / (ksize * (int)sizeof(double))) {
        return -1;
    }
    kk = malloc((size_t)outSize * ksize * sizeof(double));
    c->bounds = malloc((size_t)outSize * 2 * sizeof(int));
    c->kk = malloc((size_t)outSize * ksize * sizeof(int32_t));
    if (!kk || !c->bounds || !c->kk) {
        free(kk);
        coeffs_free(c);
        return -1;
    }
    double inv_filterscale = 1.0 / filterscale;
    for (xx = 0; xx < outSize; xx++) {
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        xmin = (int)(center - support + 0.5);
        if (xmin < 0) {
            xmin = 0;
        }
        xmax = (int)(center + support + 0.5);
        if (xmax > inSize) {
            xmax = inSize;
        }
        xmax -= xmin;
        k = &kk[xx * ksize];
        for (x = 0; x < xmax; x++) {
            double w = filterp->filter((x + xmin - center + 0.5) * inv_filterscale);
            k[x] = w;
            ww += w;
        }
        if (ww != 0.0) {
            for (x = 0; x < xmax; x++) {
                k[x] /= ww;
            }
        }
        for (; x < ksize; x++) {
            k[x] = 0;
        }
        c->bounds[xx * 2 + 0] = xmin;
        c->bounds[xx * 2 + 1] = xmax;
    }
    for (x = 0; x < outSize * ksize; x++) {
        if (kk[x] < 0) {
            c->kk[x] = (int)(-0.5 + kk[x] * (1 << PRECISION_BITS));
        } else {
            c->kk[x] = (int)(0.5 + kk[x] * (1 << PRECISION_BITS));
        }
    }
    free(kk);
    c->ksize = ksize;
    return 0;
}

/* Pillow's clip8 (a lookup there) for the sums it can produce: (in >> 22) clipped to 0..255. */
static inline uint8_t
clip8(int in) {
    int v = in >> PRECISION_BITS;
    return v < 0 ? 0 : (v > 255 ? 255 : (uint8_t)v);
}

/* ---- the two passes, scalar (any CPU) -------------------------------------------------------- */

/* rows of src (from row `first`) -> dst, each out_w 4-byte pixels, horizontally resampled */
static void
horizontal_scalar(const uint8_t *src, Py_ssize_t src_stride, int first, int rows, uint8_t *dst,
                  Py_ssize_t dst_stride, int out_w, int x_from, const coeffs *c) {
    for (int yy = 0; yy < rows; yy++) {
        const uint8_t *in = src + (first + yy) * src_stride;
        uint8_t *out = dst + yy * dst_stride;
        for (int xx = x_from; xx < out_w; xx++) {
            int xmin = c->bounds[xx * 2], xmax = c->bounds[xx * 2 + 1];
            const int32_t *k = &c->kk[xx * c->ksize];
            int ss0, ss1, ss2, ss3;
            ss0 = ss1 = ss2 = ss3 = 1 << (PRECISION_BITS - 1);
            for (int x = 0; x < xmax; x++) {
                const uint8_t *p = in + (x + xmin) * 4;
                ss0 += p[0] * k[x];
                ss1 += p[1] * k[x];
                ss2 += p[2] * k[x];
                ss3 += p[3] * k[x];
            }
            out[xx * 4 + 0] = clip8(ss0);
            out[xx * 4 + 1] = clip8(ss1);
            out[xx * 4 + 2] = clip8(ss2);
            out[xx * 4 + 3] = clip8(ss3);
        }
    }
}

/* src rows (4-byte pixels, row_bytes each) -> out_h rows, vertically resampled, from byte x_from */
static void
vertical_scalar(const uint8_t *src, Py_ssize_t src_stride, uint8_t *dst, Py_ssize_t dst_stride,
                Py_ssize_t row_bytes, int out_h, Py_ssize_t x_from, const coeffs *c) {
    for (int yy = 0; yy < out_h; yy++) {
        int ymin = c->bounds[yy * 2], ymax = c->bounds[yy * 2 + 1];
        const int32_t *k = &c->kk[yy * c->ksize];
        uint8_t *out = dst + yy * dst_stride;
        for (Py_ssize_t x = x_from; x < row_bytes; x++) {
            int ss = 1 << (PRECISION_BITS - 1);
            for (int y = 0; y < ymax; y++) {
                ss += src[(ymin + y) * src_stride + x] * k[y];
            }
            out[x] = clip8(ss);
        }
    }
}

/* ---- the two passes, AVX2 -------------------------------------------------------------------- */

#if MM_X86
static inline uint32_t
load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Two output pixels per iteration, four taps per step, with 16-bit multiply-adds (vpmaddwd: 16
 * products and 8 pair sums per instruction). A coefficient has 22 fractional bits, too wide for 16, so
 * each is split exactly into k = kh * 2^11 + kl (kl in [0, 2^11), |kh| < 2^12): two multiply-adds,
 * then (sum_h << 11) + sum_l, which is the full sum (it fits in int32, as Pillow's own does). A
 * step's four source pixels (16 bytes, R G B pad each) are loaded into both 128-bit lanes and
 * shuffled to 16-bit [tap0, tap1] pairs per channel in lane 0 and [tap2, tap3] in lane 1.
 * A pair runs the steps its wider pixel needs (taps past a pixel's count have zero coefficients),
 * so it needs xmin + 4 * steps <= in_w for both; from the first pair that does not (the right
 * edge), the scalar loop finishes the row. Per-pixel overhead, not the taps, is what costs here:
 * one iteration's reduction serves both pixels. */
__attribute__((target("avx2"))) static void
horizontal_avx2(const uint8_t *src, Py_ssize_t src_stride, int first, int rows, uint8_t *dst,
                Py_ssize_t dst_stride, int in_w, int out_w, const coeffs *c, int16_t *split) {
    const int ksize = c->ksize, steps_max = (ksize + 3) / 4;
    /* split: per pixel, per step, 16 int16 of kl then 16 of kh, zero past the pixel's count;
     * then one step count (int32) per pair */
    int32_t *steps = (int32_t *)(split + (size_t)out_w * steps_max * 32); /* 4-byte aligned: 32 int16 a row */
    memset(split, 0, (size_t)out_w * steps_max * 32 * sizeof(int16_t));
    for (int xx = 0; xx < out_w; xx++) {
        int count = c->bounds[xx * 2 + 1];
        for (int tap = 0; tap < count; tap++) {
            int16_t *lo = split + ((size_t)xx * steps_max + tap / 4) * 32, *hi = lo + 16;
            int lane = (tap % 4) / 2, t = tap % 2;
            int32_t k = c->kk[xx * ksize + tap];
            for (int ch = 0; ch < 4; ch++) {
                lo[lane * 8 + ch * 2 + t] = (int16_t)(k & 0x7ff);
                hi[lane * 8 + ch * 2 + t] = (int16_t)(k >> 11);
            }
        }
    }
    int pairs = 0;
    for (; pairs < out_w / 2; pairs++) {
        int a = 2 * pairs, b = a + 1;
        int na = (c->bounds[a * 2 + 1] + 3) / 4, nb = (c->bounds[b * 2 + 1] + 3) / 4, n = na > nb ? na : nb;
        if (c->bounds[a * 2] + 4 * n > in_w || c->bounds[b * 2] + 4 * n > in_w) {
            break;
        }
        steps[pairs] = n;
    }
    /* lane 0: taps 0, 1 of channels 0..3 as 16-bit pairs; lane 1: taps 2, 3 (bytes 8..15) */
    const __m256i spread = _mm256_setr_epi8(0, -1, 4, -1, 1, -1, 5, -1, 2, -1, 6, -1, 3, -1, 7, -1, 8, -1, 12, -1, 9,
                                            -1, 13, -1, 10, -1, 14, -1, 11, -1, 15, -1);
    const __m256i half = _mm256_set1_epi32(1 << (PRECISION_BITS - 1));
    for (int yy = 0; yy < rows; yy++) {
        const uint8_t *in = src + (first + yy) * src_stride;
        uint8_t *out = dst + yy * dst_stride;
        for (int p = 0; p < pairs; p++) {
            const uint8_t *pa = in + c->bounds[p * 4] * 4, *pb = in + c->bounds[p * 4 + 2] * 4;
            const __m256i *ka = (const __m256i *)(split + (size_t)(2 * p) * steps_max * 32);
            const __m256i *kb = ka + 2 * steps_max;
            __m256i la = _mm256_setzero_si256(), ha = la, lb = la, hb = la;
            for (int j = 0; j < steps[p]; j++) {
                __m256i xa = _mm256_shuffle_epi8(
                    _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(pa + 16 * j))), spread);
                __m256i xb = _mm256_shuffle_epi8(
                    _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(pb + 16 * j))), spread);
                la = _mm256_add_epi32(la, _mm256_madd_epi16(xa, _mm256_loadu_si256(ka + 2 * j)));
                ha = _mm256_add_epi32(ha, _mm256_madd_epi16(xa, _mm256_loadu_si256(ka + 2 * j + 1)));
                lb = _mm256_add_epi32(lb, _mm256_madd_epi16(xb, _mm256_loadu_si256(kb + 2 * j)));
                hb = _mm256_add_epi32(hb, _mm256_madd_epi16(xb, _mm256_loadu_si256(kb + 2 * j + 1)));
            }
            __m256i sa = _mm256_add_epi32(_mm256_slli_epi32(ha, 11), la);
            __m256i sb = _mm256_add_epi32(_mm256_slli_epi32(hb, 11), lb);
            /* [A's taps 0-1 | B's taps 0-1] + [A's taps 2-3 | B's taps 2-3]: 4 channels of A, of B */
            __m256i v = _mm256_add_epi32(_mm256_permute2x128_si256(sa, sb, 0x20), _mm256_permute2x128_si256(sa, sb, 0x31));
            v = _mm256_srai_epi32(_mm256_add_epi32(v, half), PRECISION_BITS);
            __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            _mm_storel_epi64((__m128i *)(out + p * 8), _mm_packus_epi16(w16, w16));
        }
    }
    if (pairs * 2 < out_w) {
        horizontal_scalar(src, src_stride, first, rows, dst, dst_stride, out_w, pairs * 2, c);
    }
}

/* 32 bytes (8 pixels) of a row per iteration, every lane with the row's own coefficients. */
__attribute__((target("avx2"))) static void
vertical_avx2(const uint8_t *src, Py_ssize_t src_stride, uint8_t *dst, Py_ssize_t dst_stride,
              Py_ssize_t row_bytes, int out_h, const coeffs *c) {
    const __m256i half = _mm256_set1_epi32(1 << (PRECISION_BITS - 1));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    Py_ssize_t vec_end = row_bytes & ~(Py_ssize_t)31;
    for (int yy = 0; yy < out_h; yy++) {
        int ymin = c->bounds[yy * 2], ymax = c->bounds[yy * 2 + 1];
        const int32_t *k = &c->kk[yy * c->ksize];
        uint8_t *out = dst + yy * dst_stride;
        for (Py_ssize_t x = 0; x < vec_end; x += 32) {
            __m256i a0 = half, a1 = half, a2 = half, a3 = half;
            for (int y = 0; y < ymax; y++) {
                const uint8_t *p = src + (ymin + y) * src_stride + x;
                __m256i kv = _mm256_set1_epi32(k[y]);
                __m128i lo = _mm_loadu_si128((const __m128i *)p);
                __m128i hi = _mm_loadu_si128((const __m128i *)(p + 16));
                a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(lo), kv));
                a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), kv));
                a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(hi), kv));
                a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), kv));
            }
            a0 = _mm256_srai_epi32(a0, PRECISION_BITS);
            a1 = _mm256_srai_epi32(a1, PRECISION_BITS);
            a2 = _mm256_srai_epi32(a2, PRECISION_BITS);
            a3 = _mm256_srai_epi32(a3, PRECISION_BITS);
            /* in-lane packs leave 4-byte groups in the order a0lo a1lo a2lo a3lo | a0hi a1hi ... */
            __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(a0, a1), _mm256_packs_epi32(a2, a3));
            _mm256_storeu_si256((__m256i *)(out + x), _mm256_permutevar8x32_epi32(bytes, order));
        }
    }
    if (vec_end < row_bytes) {
        vertical_scalar(src, src_stride, dst, dst_stride, row_bytes, out_h, vec_end, c);
    }
}

static int
have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return cached;
}
#else
static int
have_avx2(void) {
    return 0;
}
#endif

static int use_simd = 1; /* set_simd(False): the scalar loops, to test one against the other */

static void
horizontal(const uint8_t *src, Py_ssize_t src_stride, int first, int rows, uint8_t *dst, Py_ssize_t dst_stride,
           int in_w, int out_w, const coeffs *c, int16_t *split, int simd) {
#if MM_X86
    if (simd) {
        horizontal_avx2(src, src_stride, first, rows, dst, dst_stride, in_w, out_w, c, split);
        return;
    }
#endif
    horizontal_scalar(src, src_stride, first, rows, dst, dst_stride, out_w, 0, c);
}

static void
vertical(const uint8_t *src, Py_ssize_t src_stride, uint8_t *dst, Py_ssize_t dst_stride, Py_ssize_t row_bytes,
         int out_h, const coeffs *c, int simd) {
#if MM_X86
    if (simd) {
        vertical_avx2(src, src_stride, dst, dst_stride, row_bytes, out_h, c);
        return;
    }
#endif
    vertical_scalar(src, src_stride, dst, dst_stride, row_bytes, out_h, 0, c);
}

/* ---- resample() ------------------------------------------------------------------------------ */

/* The pixels of `obj`: a buffer, or an "arrow_array" capsule of a Pillow 4-band image (its Arrow
 * export: a fixed-size list whose child holds the image's one block of bytes). */
typedef struct {
    Py_buffer view;
    int is_view;
    const uint8_t *ptr;
    Py_ssize_t len;
} source;

/* Arrow C data interface (https://arrow.apache.org/docs/format/CDataInterface.html) */
struct ArrowArray {
    int64_t length;
    int64_t null_count;
    int64_t offset;
    int64_t n_buffers;
    int64_t n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};

static int
source_get(PyObject *obj, source *s) {
    s->is_view = 0;
    if (PyCapsule_CheckExact(obj)) {
        if (!PyCapsule_IsValid(obj, "arrow_array")) {
            PyErr_SetString(PyExc_ValueError, "a capsule that is not an \"arrow_array\"");
            return -1;
        }
        struct ArrowArray *a = PyCapsule_GetPointer(obj, "arrow_array");
        if (!a->release || a->n_children != 1 || !a->children || !a->children[0] || a->offset != 0) {
            PyErr_SetString(PyExc_ValueError, "arrow array: not one live child array");
            return -1;
        }
        struct ArrowArray *child = a->children[0];
        if (!child->release || child->n_buffers != 2 || !child->buffers || !child->buffers[1] || child->offset != 0 ||
            child->length != a->length * 4) {
            PyErr_SetString(PyExc_ValueError, "arrow array: not 4 bytes per pixel in one buffer");
            return -1;
        }
        s->ptr = child->buffers[1];
        s->len = (Py_ssize_t)child->length;
        return 0;
    }
    if (PyObject_GetBuffer(obj, &s->view, PyBUF_C_CONTIGUOUS) < 0) {
        return -1;
    }
    s->is_view = 1;
    s->ptr = s->view.buf;
    s->len = s->view.len;
    return 0;
}

static void
source_release(source *s) {
    if (s->is_view) {
        PyBuffer_Release(&s->view);
        s->is_view = 0;
    }
}

static int
check_size(const char *what, Py_ssize_t have, int w, int h) {
    if (w <= 0 || h <= 0 || w > (1 << 20) || h > (1 << 20)) {
        PyErr_Format(PyExc_ValueError, "%s: bad size %dx%d", what, w, h);
        return -1;
    }
    if (have != (Py_ssize_t)w * h * 4) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, a %dx%d 4-byte image has %zd", what, have, w, h,
                     (Py_ssize_t)w * h * 4);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(resample_doc,
             "resample(src, src_w, src_h, dst, dst_w, dst_h, filter, order, window)\n\n"
             "Pillow's Image.resize(..., filter, reducing_gap=None) of a 4-byte-per-pixel image, bit for bit.\n"
             "src: a C-contiguous buffer or a Pillow Arrow array capsule. window: (x0, y0, x1, y1), the part\n"
             "of the dst_w x dst_h output to compute; dst: a writable buffer of its (x1-x0) * (y1-y0) * 4 bytes. filter: PIL's LANCZOS, BILINEAR, BICUBIC, BOX or HAMMING. order: the pass\n"
             "order of Pillow 13 (13: vertical first when the height shrinks most) or of earlier ones (0).");

static PyObject *
resample(PyObject *self, PyObject *args) {
    PyObject *src_obj;
    Py_buffer dst;
    int src_w, src_h, dst_w, dst_h, filter, order, x0, y0, x1, y1;
    if (!PyArg_ParseTuple(args, "Oiiw*iiii(iiii)", &src_obj, &src_w, &src_h, &dst, &dst_w, &dst_h, &filter, &order,
                          &x0, &y0, &x1, &y1)) {
        return NULL;
    }
    source src;
    if (source_get(src_obj, &src) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    PyObject *result = NULL;
    coeffs horiz = {0}, vert = {0};
    uint8_t *temp = NULL;
    int16_t *split = NULL;
    if (check_size("src", src.len, src_w, src_h) < 0 || check_size("size", (Py_ssize_t)dst_w * dst_h * 4, dst_w, dst_h) < 0) {
        goto done;
    }
    if (x0 < 0 || y0 < 0 || x1 > dst_w || y1 > dst_h || x0 >= x1 || y0 >= y1) {
        PyErr_Format(PyExc_ValueError, "window (%d, %d, %d, %d) is not inside the %dx%d output", x0, y0, x1, y1, dst_w, dst_h);
        goto done;
    }
    int ow = x1 - x0, oh = y1 - y0;
    if (check_size("dst", dst.len, ow, oh) < 0) {
        goto done;
    }
    if (order != 0 && order != 13) {
        PyErr_Format(PyExc_ValueError, "order %d: 0 (Pillow before 13) or 13", order);
        goto done;
    }
    if (filter < 1 || filter > 5) {
        PyErr_Format(PyExc_ValueError, "filter %d is not one of LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING", filter);
        goto done;
    }
    const struct filter *fp = &FILTERS[filter];
    int need_h = dst_w != src_w, need_v = dst_h != src_h;
    if (coeffs_make(&vert, src_h, 0.0f, (float)src_h, dst_h, fp) < 0 ||
        coeffs_make(&horiz, src_w, 0.0f, (float)src_w, dst_w, fp) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    /* The window: output pixels do not depend on each other, so only its rows and columns are
     * computed (a center crop resizes no more than it keeps), from these shifted coefficients. */
    coeffs vwin = {vert.ksize, vert.bounds + 2 * y0, vert.kk + (size_t)y0 * vert.ksize};
    coeffs hwin = {horiz.ksize, horiz.bounds + 2 * x0, horiz.kk + (size_t)x0 * horiz.ksize};
    /* rows of the source the window's vertical pass reads (Pillow's ybox_first / ybox_last) */
    int first = vwin.bounds[0];
    int last = vwin.bounds[oh * 2 - 2] + vwin.bounds[oh * 2 - 1];
    int simd = use_simd && have_avx2();
    /* Pillow 13 runs the vertical pass first when the height shrinks by more than twice what the
     * width does (fewer rows for the horizontal pass); earlier Pillows always start horizontally.
     * The order changes the 8-bit intermediate, so it changes the output: `order` says whose. */
    int horizontal_first = order == 0 || !((src_h - dst_h) > 0 && (src_h - dst_h) > (src_w - dst_w) * 2);
    if (need_h && need_v) {
        temp = malloc(horizontal_first ? (size_t)(last - first) * ow * 4 : (size_t)oh * src_w * 4);
    }
    /* horizontal_avx2's split coefficients (32 int16 per pixel and step) and step counts */
    split = malloc((size_t)ow * ((horiz.ksize + 3) / 4) * 32 * sizeof(int16_t) + ((size_t)ow / 2 + 1) * sizeof(int32_t));
    if ((need_h && need_v && !temp) || !split) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    Py_ssize_t in_row = (Py_ssize_t)src_w * 4, out_row = (Py_ssize_t)ow * 4;
    if (need_h && need_v && horizontal_first) {
        /* the rows the vertical pass reads, resampled horizontally into temp, then down */
        horizontal(src.ptr, in_row, first, last - first, temp, out_row, src_w, ow, &hwin, split, simd);
        for (int i = 0; i < oh; i++) {
            vwin.bounds[i * 2] -= first;
        }
        vertical(temp, out_row, dst.buf, out_row, out_row, oh, &vwin, simd);
    } else if (need_h && need_v) {
        vertical(src.ptr, in_row, temp, in_row, in_row, oh, &vwin, simd);
        horizontal(temp, in_row, 0, oh, dst.buf, out_row, src_w, ow, &hwin, split, simd);
    } else if (need_h) {
        horizontal(src.ptr, in_row, y0, oh, dst.buf, out_row, src_w, ow, &hwin, split, simd);
    } else if (need_v) {
        vertical(src.ptr + (size_t)x0 * 4, in_row, dst.buf, out_row, out_row, oh, &vwin, simd);
    } else {
        for (int y = 0; y < oh; y++) {
            memcpy((uint8_t *)dst.buf + y * out_row, src.ptr + (y0 + y) * in_row + (size_t)x0 * 4, (size_t)out_row);
        }
    }
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
done:
    free(temp);
    free(split);
    coeffs_free(&horiz);
    coeffs_free(&vert);
    source_release(&src);
    PyBuffer_Release(&dst);
    return result;
}

/* ---- patchify() ------------------------------------------------------------------------------ */

#define PATCHIFY_LOOP(T_ITEM)                                                                             \
    do {                                                                                                  \
        const T_ITEM *tab = (const T_ITEM *)table;                                                        \
        for (int bh = 0; bh < grid_h / merge; bh++)                                                       \
            for (int bw = 0; bw < grid_w / merge; bw++)                                                   \
                for (int mh = 0; mh < merge; mh++)                                                        \
                    for (int mw = 0; mw < merge; mw++) {                                                  \
                        const uint8_t *corner = img + ((Py_ssize_t)(bh * merge + mh) * patch * w +        \
                                                       (Py_ssize_t)(bw * merge + mw) * patch) * 4;        \
                        for (int ch = 0; ch < 3; ch++) {                                                  \
                            T_ITEM *frame = (T_ITEM *)out;                                                \
                            const T_ITEM *ct = tab + ch * 256;                                            \
                            for (int r = 0; r < patch; r++) {                                             \
                                const uint8_t *px = corner + (Py_ssize_t)r * w * 4 + ch;                  \
                                for (int q = 0; q < patch; q++) {                                         \
                                    frame[r * patch + q] = ct[px[q * 4]];                                 \
                                }                                                                         \
                            }                                                                             \
                            out += frame_bytes;                                                           \
                            for (int t = 1; t < temporal; t++) {                                          \
                                memcpy(out, frame, frame_bytes);                                          \
                                out += frame_bytes;                                                       \
                            }                                                                             \
                        }                                                                                 \
                    }                                                                                     \
    } while (0)

PyDoc_STRVAR(patchify_doc,
             "patchify(src, w, h, dst, table, itemsize, patch, merge, temporal)\n\n"
             "Qwen2-VL's pixel_values from a 4-byte-per-pixel w x h image (a buffer or a Pillow Arrow array\n"
             "capsule, as resample's src): patches in (h/P/M, w/P/M, M, M)\n"
             "order, inside each (channel, temporal, row, column); each value is table[channel * 256 + byte]\n"
             "(items of itemsize 1, 2 or 4 bytes), each frame written `temporal` times into dst.");

static PyObject *
patchify(PyObject *self, PyObject *args) {
    PyObject *src_obj;
    Py_buffer dst, tab;
    int w, h, itemsize, patch, merge, temporal;
    if (!PyArg_ParseTuple(args, "Oiiw*y*iiii", &src_obj, &w, &h, &dst, &tab, &itemsize, &patch, &merge, &temporal)) {
        return NULL;
    }
    source src;
    if (source_get(src_obj, &src) < 0) {
        PyBuffer_Release(&dst);
        PyBuffer_Release(&tab);
        return NULL;
    }
    PyObject *result = NULL;
    if (check_size("src", src.len, w, h) < 0) {
        goto done;
    }
    if (itemsize != 1 && itemsize != 2 && itemsize != 4) {
        PyErr_Format(PyExc_ValueError, "itemsize %d: 1, 2 or 4", itemsize);
        goto done;
    }
    if (patch <= 0 || merge <= 0 || temporal <= 0 || patch > 4096 || merge > 64 || temporal > 64 ||
        w % (patch * merge) || h % (patch * merge)) {
        PyErr_Format(PyExc_ValueError, "a %dx%d image is not whole %dx%d patch groups (patch %d, merge %d, temporal %d)",
                     w, h, patch * merge, patch * merge, patch, merge, temporal);
        goto done;
    }
    if (tab.len != 3 * 256 * itemsize) {
        PyErr_Format(PyExc_ValueError, "table: %zd bytes, need 3 x 256 items of %d bytes", tab.len, itemsize);
        goto done;
    }
    int grid_h = h / patch, grid_w = w / patch;
    Py_ssize_t frame_bytes = (Py_ssize_t)patch * patch * itemsize;
    Py_ssize_t need = (Py_ssize_t)grid_h * grid_w * 3 * temporal * frame_bytes;
    if (dst.len != need) {
        PyErr_Format(PyExc_ValueError, "dst: %zd bytes, the patches need %zd", dst.len, need);
        goto done;
    }
    const uint8_t *img = src.ptr;
    const void *table = tab.buf;
    char *out = dst.buf;
    Py_BEGIN_ALLOW_THREADS;
    if (itemsize == 4) {
        PATCHIFY_LOOP(uint32_t);
    } else if (itemsize == 2) {
        PATCHIFY_LOOP(uint16_t);
    } else {
        PATCHIFY_LOOP(uint8_t);
    }
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
done:
    source_release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&tab);
    return result;
}

/* ---- module ---------------------------------------------------------------------------------- */

static PyObject *
simd(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(use_simd && have_avx2() ? "avx2" : "scalar");
}

static PyObject *
set_simd(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) {
        return NULL;
    }
    use_simd = on;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"resample", resample, METH_VARARGS, resample_doc},
    {"patchify", patchify, METH_VARARGS, patchify_doc},
    {"simd", simd, METH_NOARGS, "The loops resample() runs: 'avx2' or 'scalar'."},
    {"set_simd", set_simd, METH_O, "set_simd(on): allow the AVX2 loops (default) or force the scalar ones."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "preprocess._kernels", "Bit-exact resampling and patchify for the fast paths.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__kernels(void) {
    return PyModule_Create(&module);
}
