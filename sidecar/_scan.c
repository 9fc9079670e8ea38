/*
 * sidecar._scan: one pass over each chunk of a request body as it arrives, on the event loop.
 *
 * read_body (sidecar/bodies.py) counts the body's JSON structure bytes ('{', and ',' plus '[') to
 * refuse structure bombs before parsing, and copies the chunk into the body's buffer. In numpy
 * that is three compares, three counts and a copy, each a pass with its own temporary: under
 * hostile 25 MiB bodies it was over half of the loop's time (py-spy). Here it is one pass, 32
 * bytes at a time with AVX2 (a scalar loop elsewhere), copying as it counts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sidecar._scan", "One pass over a body chunk: JSON structure counts and the copy.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__scan(void) {
    return PyModule_Create(&module);
}
