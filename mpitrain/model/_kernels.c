/* The compiled kernels behind mpitrain.model.kernels (built at install when a C compiler is
 * there; the module works without them).
 *
 * Each kernel is a float32 loop that makes, element by element, the same IEEE float32
 * operations in the same order as the numpy fallback in kernels.py, so both give the same
 * bits: no operation is fused (built with -ffp-contract=off, no -ffast-math), the
 * exponential is mt_exp below (not the C library's), a row's sum is the halving sum below.
 * The loops read and write plain C-contiguous float32 buffers (the buffer protocol: no
 * numpy headers at build time) and run without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define MT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MT_CLONES
#endif

/* exp(t) for float32 (Cephes' expf: Cody-Waite reduction by ln 2, a degree-5 polynomial),
 * with t clamped to [EXP_LO, EXP_HI]: below, exp(EXP_LO) (sigmoid only adds it to 1); above
 * ln(FLT_MAX), inf.  k = rint(t log2 e) by the 1.5 * 2^23 rounding trick, and 2^k as
 * 2^(k-1) * 2, so that the only rounding at the top of the range is the last product. */
#define EXP_LO (-86.5f)
#define EXP_HI (88.75f)
#define LOG2E 1.44269504088896341f
#define MAGIC 12582912.0f
#define C1 0.693359375f
#define C2 (-2.12194440e-4f)
#define P0 1.9875691500e-4f
#define P1 1.3981999507e-3f
#define P2 8.3334519073e-3f
#define P3 4.1665795894e-2f
#define P4 1.6666665459e-1f
#define P5 5.0000001201e-1f

/* Written on 8 floats at once with GCC's vector extensions (the same operations lane by
 * lane; the clamps are a compare and a select by mask, so a NaN stays NaN). */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) v8f mt_exp(v8f t)
{
    const v8f lo = {EXP_LO, EXP_LO, EXP_LO, EXP_LO, EXP_LO, EXP_LO, EXP_LO, EXP_LO};
    const v8f hi = {EXP_HI, EXP_HI, EXP_HI, EXP_HI, EXP_HI, EXP_HI, EXP_HI, EXP_HI};
    v8i below = t < lo, above = t > hi;
    t = (v8f)(((v8i)lo & below) | ((v8i)t & ~below));
    t = (v8f)(((v8i)hi & above) | ((v8i)t & ~above));
    v8f shifted = t * LOG2E + MAGIC;  /* k in its low mantissa bits: 0x4B400000 + k */
    v8f k = shifted - MAGIC;
    v8f r = t - k * C1;
    r = r - k * C2;
    v8f z = r * r;
    v8f p = P0 * r + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    p = p * z;
    p = p + r;
    p = p + 1.0f;
    v8u bits = ((v8u)shifted - 0x4B400000u + 126u) << 23;  /* (a NaN: any; p is NaN) */
    return p * (v8f)bits * 2.0f;
}

MT_CLONES static void sigmoid_loop(const float *x, float *out, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f v;
        memcpy(&v, x + i, sizeof v);
        v = 1.0f / (mt_exp(-v) + 1.0f);
        memcpy(out + i, &v, sizeof v);
    }
    if (i < n) {  /* the last 1-7, in a vector padded with zeros */
        v8f v = {0};
        memcpy(&v, x + i, (size_t)(n - i) * sizeof(float));
        v = 1.0f / (mt_exp(-v) + 1.0f);
        memcpy(out + i, &v, (size_t)(n - i) * sizeof(float));
    }
}

MT_CLONES static void sigmoid_grad_loop(const float *dy, const float *s, float *out,
                                        Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = (1.0f - s[i]) * s[i] * dy[i];
}

/* The halving sum of buf[0:m], in place: while m > 1, h = m / 2, buf[j] += buf[m - h + j]
 * for j < h, m -= h (an odd m leaves its middle element where it is). */
MT_CLONES static float halving_sum(float *buf, Py_ssize_t m)
{
    if (m == 0)
        return 0.0f;
    while (m > 1) {
        Py_ssize_t h = m / 2, off = m - h;
        for (Py_ssize_t j = 0; j < h; j++)
            buf[j] = buf[j] + buf[off + j];
        m = off;
    }
    return buf[0];
}

MT_CLONES static void layernorm_loop(const float *x, const float *gamma, const float *beta,
                                     float eps, float *y, float *xhat, float *inv,
                                     float *buf, Py_ssize_t n, Py_ssize_t m)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *xr = x + i * m;
        float *yr = y + i * m, *hr = xhat + i * m;
        memcpy(buf, xr, (size_t)m * sizeof(float));
        float mean = halving_sum(buf, m) / (float)m;
        for (Py_ssize_t j = 0; j < m; j++) {
            hr[j] = xr[j] - mean;
            buf[j] = hr[j] * hr[j];
        }
        float var = halving_sum(buf, m) / (float)m;
        float s = 1.0f / sqrtf(var + eps);
        inv[i] = s;
        for (Py_ssize_t j = 0; j < m; j++) {
            hr[j] = hr[j] * s;
            yr[j] = hr[j] * gamma[j] + beta[j];
        }
    }
}

MT_CLONES static void layernorm_dx_loop(const float *g, const float *xhat, const float *inv,
                                        const float *gamma, float *dx, float *buf,
                                        Py_ssize_t n, Py_ssize_t m)
{
    float *d = buf, *t = buf + m;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *gr = g + i * m, *hr = xhat + i * m;
        float *dr = dx + i * m;
        for (Py_ssize_t j = 0; j < m; j++)
            d[j] = gr[j] * gamma[j];
        memcpy(t, d, (size_t)m * sizeof(float));
        float sum = halving_sum(t, m);
        for (Py_ssize_t j = 0; j < m; j++)
            t[j] = d[j] * hr[j];
        float dot = halving_sum(t, m);
        float scale = inv[i] / (float)m;
        float a = dot * scale, b = sum * scale;
        for (Py_ssize_t j = 0; j < m; j++)
            dr[j] = d[j] * inv[i] - (hr[j] * a + b);
    }
}

/* -- the Python side: C-contiguous float32 buffers of checked lengths ------------------ */

static int take(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t count,
                const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    if (view->itemsize != 4 || view->format == NULL || strcmp(view->format, "f") != 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected float32, got format %s", name,
                     view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    if (view->len / 4 != count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd elements, got %zd", name, count,
                     view->len / 4);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static void release(Py_buffer *views, int k)
{
    for (int i = 0; i < k; i++)
        PyBuffer_Release(&views[i]);
}

/* Take the buffers named in names (in order; writable from index first_out on). */
static int take_all(PyObject **objs, Py_buffer *v, const char **names, const Py_ssize_t *counts,
                    int k, int first_out)
{
    for (int i = 0; i < k; i++) {
        if (take(objs[i], &v[i], i >= first_out, counts[i], names[i]) < 0) {
            release(v, i);
            return -1;
        }
    }
    return 0;
}

/* Whether n rows of m elements can be counted (the buffers' lengths are checked against it). */
static int rows_fit(Py_ssize_t n, Py_ssize_t m, const char *what)
{
    if (n < 0 || m < 0 || (m && n > PY_SSIZE_T_MAX / m)) {
        PyErr_Format(PyExc_OverflowError, "%s: n * m out of range", what);
        return 0;
    }
    return 1;
}

static PyObject *py_sigmoid(PyObject *self, PyObject *args)
{
    PyObject *o[2];
    Py_ssize_t n;
    Py_buffer v[2];
    static const char *names[2] = {"x", "out"};
    if (!PyArg_ParseTuple(args, "OOn", &o[0], &o[1], &n) || !rows_fit(n, 1, "sigmoid"))
        return NULL;
    Py_ssize_t counts[2] = {n, n};
    if (take_all(o, v, names, counts, 2, 1) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    sigmoid_loop(v[0].buf, v[1].buf, n);
    Py_END_ALLOW_THREADS
    release(v, 2);
    Py_RETURN_NONE;
}

static PyObject *py_sigmoid_grad(PyObject *self, PyObject *args)
{
    PyObject *o[3];
    Py_ssize_t n;
    Py_buffer v[3];
    static const char *names[3] = {"dy", "s", "out"};
    if (!PyArg_ParseTuple(args, "OOOn", &o[0], &o[1], &o[2], &n) ||
        !rows_fit(n, 1, "sigmoid_grad"))
        return NULL;
    Py_ssize_t counts[3] = {n, n, n};
    if (take_all(o, v, names, counts, 3, 2) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    sigmoid_grad_loop(v[0].buf, v[1].buf, v[2].buf, n);
    Py_END_ALLOW_THREADS
    release(v, 3);
    Py_RETURN_NONE;
}

static PyObject *py_layernorm(PyObject *self, PyObject *args)
{
    PyObject *o[6];
    double eps;
    Py_ssize_t n, m;
    Py_buffer v[6];
    static const char *names[6] = {"x", "gamma", "beta", "y", "xhat", "inv"};
    if (!PyArg_ParseTuple(args, "OOOdOOOnn", &o[0], &o[1], &o[2], &eps, &o[3], &o[4], &o[5],
                          &n, &m))
        return NULL;
    if (!rows_fit(n, m, "layernorm"))
        return NULL;
    Py_ssize_t counts[6] = {n * m, m, m, n * m, n * m, n};
    if (take_all(o, v, names, counts, 6, 3) < 0)
        return NULL;
    float *buf = malloc((size_t)(m > 0 ? m : 1) * sizeof(float));
    if (buf == NULL) {
        release(v, 6);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    layernorm_loop(v[0].buf, v[1].buf, v[2].buf, (float)eps, v[3].buf, v[4].buf, v[5].buf,
                   buf, n, m);
    Py_END_ALLOW_THREADS
    free(buf);
    release(v, 6);
    Py_RETURN_NONE;
}

static PyObject *py_layernorm_dx(PyObject *self, PyObject *args)
{
    PyObject *o[5];
    Py_ssize_t n, m;
    Py_buffer v[5];
    static const char *names[5] = {"g", "xhat", "inv", "gamma", "dx"};
    if (!PyArg_ParseTuple(args, "OOOOOnn", &o[0], &o[1], &o[2], &o[3], &o[4], &n, &m))
        return NULL;
    if (!rows_fit(n, m, "layernorm_dx"))
        return NULL;
    Py_ssize_t counts[5] = {n * m, n * m, n, m, n * m};
    if (take_all(o, v, names, counts, 5, 4) < 0)
        return NULL;
    float *buf = malloc((size_t)(m > 0 ? 2 * m : 1) * sizeof(float));
    if (buf == NULL) {
        release(v, 5);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    layernorm_dx_loop(v[0].buf, v[1].buf, v[2].buf, v[3].buf, v[4].buf, buf, n, m);
    Py_END_ALLOW_THREADS
    free(buf);
    release(v, 5);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sigmoid", py_sigmoid, METH_VARARGS, "sigmoid(x, out, n): out = 1 / (exp(-x) + 1)"},
    {"sigmoid_grad", py_sigmoid_grad, METH_VARARGS,
     "sigmoid_grad(dy, s, out, n): out = (1 - s) s dy"},
    {"layernorm", py_layernorm, METH_VARARGS,
     "layernorm(x, gamma, beta, eps, y, xhat, inv, n, m): each row normalised"},
    {"layernorm_dx", py_layernorm_dx, METH_VARARGS,
     "layernorm_dx(g, xhat, inv, gamma, dx, n, m): the input's gradient"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "mpitrain's compiled float32 kernels (see mpitrain.model.kernels)", -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void)
{
    return PyModule_Create(&module);
}
