/*
 * sidecar._scan: one pass over each chunk of a request body as it arrives, on the event loop.
 *
 * read_body (sidecar/bodies.py) counts the body's JSON structure bytes ('{', and ',' plus '[') to
 * refuse structure bombs before parsing, and copies the chunk into the body's buffer. In numpy
 * that is three compares, three counts and a copy, each a pass with its own temporary: under
 * hostile 25 MiB bodies it was over half of the loop's time (py-spy). Here it is one pass, 32
 * bytes at a time with AVX2 (a scalar loop elsewhere), copying as it counts.
 *
 * find_runs(): sidecar/hollow.py's search for long base64 runs, in one pass with the GIL released
 * (it runs in a background thread; the numpy version made eight passes and held the GIL between
 * them, which the event loop then waited for).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <sched.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define SCAN_X86 1
#else
#define SCAN_X86 0
#endif

static void
count_scalar(const uint8_t *p, Py_ssize_t n, uint8_t *out, Py_ssize_t *objects, Py_ssize_t *items) {
    Py_ssize_t o = 0, i = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        uint8_t b = p[k];
        o += b == '{';
        i += (b == ',') + (b == '[');
    }
    if (out) {
        memcpy(out, p, (size_t)n);
    }
    *objects += o;
    *items += i;
}

#if SCAN_X86
__attribute__((target("avx2,popcnt"))) static void
count_avx2(const uint8_t *p, Py_ssize_t n, uint8_t *out, Py_ssize_t *objects, Py_ssize_t *items) {
    const __m256i brace = _mm256_set1_epi8('{'), comma = _mm256_set1_epi8(','), bracket = _mm256_set1_epi8('[');
    Py_ssize_t o = 0, i = 0, k = 0;
    for (; k + 32 <= n; k += 32) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(p + k));
        if (out) {
            _mm256_storeu_si256((__m256i *)(out + k), v);
        }
        o += __builtin_popcount((unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, brace)));
        i += __builtin_popcount((unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, comma)));
        i += __builtin_popcount((unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, bracket)));
    }
    *objects += o;
    *items += i;
    count_scalar(p + k, n - k, out ? out + k : NULL, objects, items);
}

static int
have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    }
    return cached;
}
#endif

/* ---- find_runs ------------------------------------------------------------------------------- */

/* Per byte: 1 if base64 (A-Z a-z 0-9 + / =), and 2 more if also not a number character (digits,
 * e, E, +): a run made only of number characters could be a JSON number, not data. */
static uint8_t CLASS[256];

static void
class_init(void) {
    for (int b = 0; b < 256; b++) {
        int base64 = (b >= 'A' && b <= 'Z') || (b >= 'a' && b <= 'z') || (b >= '0' && b <= '9') || b == '+' ||
                     b == '/' || b == '=';
        int number = (b >= '0' && b <= '9') || b == 'e' || b == 'E' || b == '+';
        CLASS[b] = (uint8_t)(base64 ? 1 + (number ? 0 : 2) : 0);
    }
}

/* 32 bytes -> (base64 mask, not-a-number mask), bit i for byte i */
static inline void
masks_scalar(const uint8_t *p, uint32_t *base64, uint32_t *other) {
    uint32_t m = 0, o = 0;
    for (int i = 0; i < 32; i++) {
        uint8_t c = CLASS[p[i]];
        m |= (uint32_t)(c & 1) << i;
        o |= (uint32_t)(c >> 1) << i;
    }
    *base64 = m;
    *other = o;
}

#if SCAN_X86
__attribute__((target("avx2"))) static inline void
masks_avx2(const uint8_t *p, uint32_t *base64, uint32_t *other) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    /* letters: (b | 0x20) - 'a' < 26; '/' and digits: b - '/' < 11 (unsigned, via min) */
    __m256i letter = _mm256_sub_epi8(_mm256_or_si256(v, _mm256_set1_epi8(0x20)), _mm256_set1_epi8('a'));
    letter = _mm256_cmpeq_epi8(_mm256_min_epu8(letter, _mm256_set1_epi8(25)), letter);
    __m256i digit = _mm256_sub_epi8(v, _mm256_set1_epi8('0'));
    digit = _mm256_cmpeq_epi8(_mm256_min_epu8(digit, _mm256_set1_epi8(9)), digit);
    __m256i plus = _mm256_cmpeq_epi8(v, _mm256_set1_epi8('+'));
    __m256i slash_eq = _mm256_or_si256(_mm256_cmpeq_epi8(v, _mm256_set1_epi8('/')), _mm256_cmpeq_epi8(v, _mm256_set1_epi8('=')));
    __m256i e = _mm256_cmpeq_epi8(_mm256_or_si256(v, _mm256_set1_epi8(0x20)), _mm256_set1_epi8('e'));
    __m256i all = _mm256_or_si256(_mm256_or_si256(letter, digit), _mm256_or_si256(plus, slash_eq));
    /* not a number character: a letter other than e/E, or / or = */
    __m256i not_number = _mm256_or_si256(_mm256_andnot_si256(e, letter), slash_eq);
    *base64 = (uint32_t)_mm256_movemask_epi8(all);
    *other = (uint32_t)_mm256_movemask_epi8(not_number);
}
#endif

typedef struct {
    Py_ssize_t *items; /* start, end pairs */
    Py_ssize_t len, cap;
    int failed;
} runs_t;

static void
runs_add(runs_t *r, Py_ssize_t start, Py_ssize_t end) {
    if (r->failed) {
        return;
    }
    if (r->len + 2 > r->cap) {
        Py_ssize_t cap = r->cap ? r->cap * 2 : 64;
        Py_ssize_t *grown = realloc(r->items, (size_t)cap * sizeof(Py_ssize_t));
        if (!grown) {
            r->failed = 1;
            return;
        }
        r->items = grown;
        r->cap = cap;
    }
    r->items[r->len++] = start;
    r->items[r->len++] = end;
}

/* Every maximal run of base64 bytes of at least min_run bytes holding a byte that is not a number
 * character, in order. Runs are tracked across 32-byte blocks by their start (after the last
 * non-base64 byte) and whether they hold such a byte yet. One body, two compilations (the AVX2
 * masks must inline into an AVX2 function): SCAN_RUNS(name, masks, attributes). */
/* find_runs runs in a background thread without the GIL, often on the event loop's CPU. The
 * scheduler lets it finish a slice (milliseconds) before a woken loop thread gets that CPU back, even
 * at nice 19; yielding every 1 MiB (~0.25 ms of scanning) bounds that wait. */
#define YIELD_EVERY (1 << 20)

#define SCAN_RUNS(NAME, MASKS, ATTRS)                                                                      \
    ATTRS static void NAME(const uint8_t *a, Py_ssize_t n, Py_ssize_t min_run, runs_t *out) {              \
        Py_ssize_t start = 0; /* where the current run began */                                          \
        int other = 0;        /* it holds a byte that is not a number character */                       \
        uint8_t pad[32];                                                                                  \
        for (Py_ssize_t block = 0; block < n; block += 32) {                                              \
            if (block % YIELD_EVERY == 0 && block) {                                                      \
                sched_yield(); /* the loop shares the CPU: give it the CPU now, not at our slice's end */ \
            }                                                                                             \
            const uint8_t *p = a + block;                                                                 \
            if (n - block < 32) {                                                                         \
                memset(pad, 0, sizeof pad); /* NUL is not base64: the run ends at n, as it should */      \
                memcpy(pad, p, (size_t)(n - block));                                                      \
                p = pad;                                                                                  \
            }                                                                                             \
            uint32_t m, o;                                                                                \
            MASKS(p, &m, &o);                                                                             \
            if (m == 0xffffffffu) {                                                                       \
                other |= o != 0;                                                                          \
                continue;                                                                                 \
            }                                                                                             \
            uint32_t ends = ~m;                                                                           \
            if (min_run > 32) {                                                                           \
                /* Only the block's first end can close a run long enough; the runs between its ends    \
                 * are shorter than the block. So: that first end, then a new run after the last. */    \
                int z = __builtin_ctz(ends), last = 31 - __builtin_clz(ends);                             \
                other |= (o & (z == 0 ? 0 : 0xffffffffu >> (32 - z))) != 0;                               \
                if (block + z - start >= min_run && other) {                                              \
                    runs_add(out, start, block + z);                                                      \
                }                                                                                         \
                start = block + last + 1;                                                                 \
                other = last < 31 && (o >> (last + 1)) != 0;                                              \
                continue;                                                                                 \
            }                                                                                             \
            int pos = 0;                                                                                  \
            while (ends) {                                                                                \
                int z = __builtin_ctz(ends);                                                              \
                uint32_t below_z = z == 0 ? 0 : 0xffffffffu >> (32 - z);                                  \
                uint32_t below_pos = pos == 0 ? 0 : 0xffffffffu >> (32 - pos);                            \
                other |= (o & below_z & ~below_pos) != 0;                                                 \
                if (block + z - start >= min_run && other) {                                              \
                    runs_add(out, start, block + z);                                                      \
                }                                                                                         \
                start = block + z + 1;                                                                    \
                other = 0;                                                                                \
                pos = z + 1;                                                                              \
                ends &= ends - 1;                                                                         \
            }                                                                                             \
            if (pos < 32) {                                                                               \
                other |= (o >> pos) != 0;                                                                 \
            }                                                                                             \
        }                                                                                                 \
        /* n a multiple of 32: a run reaching the end is still open */                                    \
        if (n % 32 == 0 && n - start >= min_run && other) {                                               \
            runs_add(out, start, n);                                                                      \
        }                                                                                                 \
    }

SCAN_RUNS(scan_runs_scalar, masks_scalar, )
#if SCAN_X86
SCAN_RUNS(scan_runs_avx2, masks_avx2, __attribute__((target("avx2"))))
#endif

PyDoc_STRVAR(find_runs_doc,
             "find_runs(buf, min_run) -> list of (start, end)\n\n"
             "The [start, end) of every maximal run of at least min_run base64 bytes (A-Z a-z 0-9 + / =) that\n"
             "holds a byte other than digits, e, E, + (which could be a number), in order. Releases the GIL.");

static PyObject *
find_runs(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t min_run;
    if (!PyArg_ParseTuple(args, "y*n", &buf, &min_run)) {
        return NULL;
    }
    if (min_run < 1) {
        PyBuffer_Release(&buf);
        PyErr_Format(PyExc_ValueError, "min_run %zd: at least 1", min_run);
        return NULL;
    }
    runs_t runs = {0};
    Py_BEGIN_ALLOW_THREADS;
#if SCAN_X86
    if (have_avx2()) {
        scan_runs_avx2(buf.buf, buf.len, min_run, &runs);
    } else
#endif
        scan_runs_scalar(buf.buf, buf.len, min_run, &runs);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&buf);
    if (runs.failed) {
        free(runs.items);
        return PyErr_NoMemory();
    }
    PyObject *list = PyList_New(runs.len / 2);
    for (Py_ssize_t i = 0; list && i < runs.len / 2; i++) {
        PyObject *pair = Py_BuildValue("nn", runs.items[2 * i], runs.items[2 * i + 1]);
        if (!pair) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, pair);
    }
    free(runs.items);
    return list;
}

PyDoc_STRVAR(copy_count_doc,
             "copy_count(chunk, dst, offset) -> (objects, items)\n\n"
             "Count '{' (objects) and ',' plus '[' (items) in chunk and, unless dst is None, copy chunk into the\n"
             "writable buffer dst at offset (which must hold it).");

static PyObject *
copy_count(PyObject *self, PyObject *args) {
    Py_buffer chunk, dst = {0};
    PyObject *dst_obj;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "y*On", &chunk, &dst_obj, &offset)) {
        return NULL;
    }
    uint8_t *out = NULL;
    if (dst_obj != Py_None) {
        if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            PyBuffer_Release(&chunk);
            return NULL;
        }
        if (offset < 0 || offset > dst.len || chunk.len > dst.len - offset) {
            PyErr_Format(PyExc_ValueError, "a %zd-byte chunk at offset %zd does not fit a %zd-byte buffer", chunk.len,
                         offset, dst.len);
            PyBuffer_Release(&dst);
            PyBuffer_Release(&chunk);
            return NULL;
        }
        out = (uint8_t *)dst.buf + offset;
    }
    Py_ssize_t objects = 0, items = 0;
#if SCAN_X86
    if (have_avx2()) {
        count_avx2(chunk.buf, chunk.len, out, &objects, &items);
    } else
#endif
        count_scalar(chunk.buf, chunk.len, out, &objects, &items);
    if (out) {
        PyBuffer_Release(&dst);
    }
    PyBuffer_Release(&chunk);
    return Py_BuildValue("nn", objects, items);
}

static PyMethodDef methods[] = {
    {"copy_count", copy_count, METH_VARARGS, copy_count_doc},
    {"find_runs", find_runs, METH_VARARGS, find_runs_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sidecar._scan", "One pass over a body chunk: JSON structure counts and the copy.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__scan(void) {
    class_init();
    return PyModule_Create(&module);
}
