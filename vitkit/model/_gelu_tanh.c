/* The tanh-approximated GELU on float32 arrays, forward and backward, in one pass over memory each.
 *
 * MindSpore's ViT (vitkit's default numerics) uses GELU's tanh form. torch's CPU kernel for it computes a full
 * precision tanh per element and runs markedly slower, forward and backward, than the erf form timm uses; on a
 * small ViT, whose activations are large next to its matrix products, that shows in the step. The same function,
 * written as
 *
 *     gelu(x) = 0.5 x (1 + tanh(u)) = x * s,   s = sigmoid(2u) = 1 / (1 + e),   e = exp(-2u),
 *     u = sqrt(2/pi) (x + 0.044715 x^3),
 *     gelu'(x) = s + x * 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2) * e * s^2       (s (1 - s) = e s^2),
 *
 * needs one exp per element and no 1 + tanh cancellation, so it is also closer to the exact value where x is
 * very negative. exp is evaluated with AVX2/FMA (8 floats at a time: 2^n times a degree-7 Taylor polynomial on
 * |r| <= ln(2)/2, whose truncation error, 5e-9, is below a float's rounding), selected at run time; `vectorized`
 * says whether this CPU has it. The Python side uses these kernels only then, and torch's own otherwise.
 *
 * forward(x, out, threads): out[i] = gelu(x[i]); backward(grad, x, out, threads): out[i] = grad[i] * gelu'(x[i]).
 * Arguments are C-contiguous float32 buffers of one length (numpy views of torch tensors); out may not overlap the
 * inputs. Large arrays are split over up to `threads` threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

static const float kTwoSqrtTwoOverPi = 1.5957691216057308f; /* 2 sqrt(2/pi) */
static const float kCubic = 0.044715f;
/* exp's argument is clamped here: 2^n stays a normal float for every n the rounding can give. */
static const float kExpLow = -87.0f;
static const float kExpHigh = 88.0f;

static float exp_minus_twice_u(float x) {
    float z = -kTwoSqrtTwoOverPi * x * (1.0f + kCubic * x * x);
    z = z < kExpLow ? kExpLow : (z > kExpHigh ? kExpHigh : z);
    return expf(z);
}

static void forward_scalar(const float *x, float *out, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        out[i] = x[i] / (1.0f + exp_minus_twice_u(x[i]));
    }
}

static void backward_scalar(const float *grad, const float *x, float *out, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        float e = exp_minus_twice_u(x[i]);
        float s = 1.0f / (1.0f + e);
        float slope = kTwoSqrtTwoOverPi * (1.0f + 3.0f * kCubic * x[i] * x[i]);
        out[i] = grad[i] * (s + x[i] * slope * ((e * s) * s)); /* e * s <= 1 first: e alone can be 1e38 */
    }
}

#ifdef HAVE_X86
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static __m256 exp8(__m256 z) {
    z = _mm256_min_ps(_mm256_max_ps(z, _mm256_set1_ps(kExpLow)), _mm256_set1_ps(kExpHigh));
    /* z = n ln2 + r with integer n; ln2 in two parts so that n * ln2 is exact to float precision. */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(z, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), z);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    /* Horner's scheme for sum_{k<=7} r^k / k!. */
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* 2^n from its exponent bits. */
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

AVX2 static __m256 exp_minus_twice_u8(__m256 x) {
    __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(kCubic), _mm256_set1_ps(1.0f));
    return exp8(_mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(-kTwoSqrtTwoOverPi)), inner));
}

AVX2 static void forward_avx2(const float *x, float *out, Py_ssize_t count) {
    const __m256 one = _mm256_set1_ps(1.0f);
    Py_ssize_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        _mm256_storeu_ps(out + i, _mm256_div_ps(v, _mm256_add_ps(one, exp_minus_twice_u8(v))));
    }
    forward_scalar(x + i, out + i, count - i);
}

AVX2 static void backward_avx2(const float *grad, const float *x, float *out, Py_ssize_t count) {
    const __m256 one = _mm256_set1_ps(1.0f);
    Py_ssize_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 e = exp_minus_twice_u8(v);
        __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, e));
        __m256 slope = _mm256_mul_ps(_mm256_set1_ps(kTwoSqrtTwoOverPi),
                                     _mm256_fmadd_ps(_mm256_mul_ps(v, v), _mm256_set1_ps(3.0f * kCubic), one));
        __m256 tail = _mm256_mul_ps(_mm256_mul_ps(v, slope), _mm256_mul_ps(_mm256_mul_ps(e, s), s));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(grad + i), _mm256_add_ps(s, tail)));
    }
    backward_scalar(grad + i, x + i, out + i, count - i);
}
#endif

static int has_avx2(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static int vectorized;

/* One contiguous stretch of the work: grad is NULL for the forward. */
struct stretch {
    const float *grad, *x;
    float *out;
    Py_ssize_t count;
};

static void *run_stretch(void *arg) {
    struct stretch *job = arg;
#ifdef HAVE_X86
    if (vectorized) {
        if (job->grad) backward_avx2(job->grad, job->x, job->out, job->count);
        else forward_avx2(job->x, job->out, job->count);
        return NULL;
    }
#endif
    if (job->grad) backward_scalar(job->grad, job->x, job->out, job->count);
    else forward_scalar(job->x, job->out, job->count);
    return NULL;
}

/* Splits the work over up to `threads` threads (torch's intra-op count, whose threads are idle meanwhile), each with
 * at least kMinStretch elements so that starting a thread (tens of microseconds) stays small beside its share. */
enum { kMaxThreads = 64, kMinStretch = 1 << 17 };

static void run(const float *grad, const float *x, float *out, Py_ssize_t count, int threads) {
    Py_ssize_t most = count / kMinStretch;
    if (threads > most) threads = (int)most;
    if (threads > kMaxThreads) threads = kMaxThreads;
    if (threads < 1) threads = 1;
    struct stretch jobs[kMaxThreads];
    pthread_t ids[kMaxThreads];
    int started[kMaxThreads] = {0};
    Py_ssize_t share = (count / threads + 7) / 8 * 8; /* whole vectors, so only the last stretch has a tail */
    for (int k = 0; k < threads; k++) {
        Py_ssize_t first = share * k, last = k == threads - 1 ? count : share * (k + 1);
        if (last > count) last = count;
        if (first > last) first = last;
        jobs[k] = (struct stretch){grad ? grad + first : NULL, x + first, out + first, last - first};
    }
    for (int k = 1; k < threads; k++) {
        started[k] = pthread_create(&ids[k], NULL, run_stretch, &jobs[k]) == 0;
    }
    run_stretch(&jobs[0]);
    for (int k = 1; k < threads; k++) {
        if (started[k]) pthread_join(ids[k], NULL);
        else run_stretch(&jobs[k]); /* no thread to be had: this one does the stretch */
    }
}

/* Views `objects` as float32 C-contiguous buffers of one length, the last one writable. 0 and an exception if not. */
static int get_buffers(PyObject **objects, Py_buffer *views, int n) {
    for (int k = 0; k < n; k++) {
        int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (k == n - 1 ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(objects[k], &views[k], flags) < 0) {
            for (int j = 0; j < k; j++) PyBuffer_Release(&views[j]);
            return 0;
        }
        const char *format = views[k].format ? views[k].format : "B";
        int is_float = views[k].itemsize == 4 && (strcmp(format, "f") == 0 || strcmp(format, "=f") == 0 ||
                                                  strcmp(format, "<f") == 0);
        if (!is_float || views[k].len != views[0].len) {
            for (int j = 0; j <= k; j++) PyBuffer_Release(&views[j]);
            PyErr_SetString(PyExc_ValueError, "expected float32 contiguous buffers of one length");
            return 0;
        }
    }
    return 1;
}

static PyObject *forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *objects[2];
    Py_buffer views[2];
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OO|i", &objects[0], &objects[1], &threads) || !get_buffers(objects, views, 2)) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    run(NULL, views[0].buf, views[1].buf, views[0].len / 4, threads);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 2; k++) PyBuffer_Release(&views[k]);
    Py_RETURN_NONE;
}

static PyObject *backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *objects[3];
    Py_buffer views[3];
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOO|i", &objects[0], &objects[1], &objects[2], &threads) ||
        !get_buffers(objects, views, 3)) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    run(views[0].buf, views[1].buf, views[2].buf, views[0].len / 4, threads);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 3; k++) PyBuffer_Release(&views[k]);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"forward", forward, METH_VARARGS, "forward(x, out, threads=1): out = gelu_tanh(x), float32 buffers"},
    {"backward", backward, METH_VARARGS,
     "backward(grad, x, out, threads=1): out = grad * gelu_tanh'(x), float32 buffers"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gelu_tanh", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gelu_tanh(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    vectorized = has_avx2();
    if (PyModule_AddIntConstant(m, "vectorized", vectorized) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
