/* Softmax self-attention on float32 CPU tensors, forward and backward, one (image, head) pair at a time.
 *
 * On a 2-core CPU, SDPA's flash kernel is 17 % of a ViT-Ti/16 training step: it tiles each 197 x 197 score
 * matrix into small products and recomputes it twice in the backward. One head's whole score matrix (155 KB at
 * 197 tokens) fits in a core's L2 cache, so here each thread takes whole (image, head) pairs and runs each product
 * of the pair as one MKL sgemm (torch's own BLAS, single-threaded inside this OpenMP region), with the softmax in
 * between while the scores are still in cache:
 *
 *     forward:   S = scale Q K^T,  P = softmax(S) by rows,  O = P V,  lse = log-sum-exp of each row of S
 *     backward:  P = exp(scale Q K^T - lse),  dV = P^T dO,  dP = dO V^T,  dS = P (dP - rowsum(dO O)),
 *                dQ = scale dS K,  dK = scale dS^T Q
 *
 * Like the flash kernel it keeps only lse (one float per query) for the backward, not P.
 *
 * Layouts (C order, float32): qkv (batch, tokens, 3, heads, width) as the fused projection writes it; out and
 * grad_out (batch, tokens, heads, width); lse (batch, heads, tokens); grad_qkv like qkv, every element written, so
 * that the projection's backward takes it as is: no permute, no concatenation.
 *
 * bind(address) takes the address of an LP64 Fortran sgemm_ (MKL's, from torch's own library); nothing runs before
 * it. exp is vectorized with AVX2/FMA when the CPU has it (`vectorized`).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "_avx2_exp.h"

typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);

typedef int (*set_threads_fn)(int threads);

static sgemm_fn sgemm;
static set_threads_fn set_local_threads;
static int vectorized;

/* Row-major product helpers. A row-major (rows x cols, row stride ld) matrix is the column-major (cols x rows)
 * matrix with leading dimension ld, so row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T. */

/* c (m x n, ldc) = alpha * a (m x k, lda) @ b^T (b is n x k, ldb) + beta * c */
static void mm_nt(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                  float *c, int ldc) {
    sgemm("T", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

/* c (m x n, ldc) = a (m x k, lda) @ b (k x n, ldb) */
static void mm_nn(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float *c,
                  int ldc) {
    const float zero = 0.0f;
    sgemm("N", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &zero, c, &ldc);
}

/* c (m x n, ldc) = a^T (a is k x m, lda) @ b (k x n, ldb) */
static void mm_tn(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float *c,
                  int ldc) {
    const float zero = 0.0f;
    sgemm("N", "T", &n, &m, &k, &alpha, b, &ldb, a, &lda, &zero, c, &ldc);
}

/* The row-wise steps between the products, on one row of scores: each has a scalar form, and an AVX2 form that
 * does the whole vectors and leaves the tail (the last count % 8 values) to the scalar one. */

/* row[j] = exp(row[j] - shift) for j >= first; returns their sum. */
static float exp_shifted_scalar(float *row, int first, int count, float shift) {
    float sum = 0.0f;
    for (int j = first; j < count; j++) {
        row[j] = expf(row[j] - shift);
        sum += row[j];
    }
    return sum;
}

/* Softmax of the row in place; returns its log-sum-exp. */
static float softmax_row_scalar(float *row, int count) {
    float top = row[0];
    for (int j = 1; j < count; j++) top = row[j] > top ? row[j] : top;
    float sum = exp_shifted_scalar(row, 0, count, top);
    float inverse = 1.0f / sum;
    for (int j = 0; j < count; j++) row[j] *= inverse;
    return top + logf(sum);
}

/* grad[j] = scale * probs[j] * (grad[j] - dot(out, grad_out)) for j >= first, the softmax's backward. */
static void score_gradient_scalar(const float *probs, float *grad, int first, int count, float dot, float scale) {
    for (int j = first; j < count; j++) grad[j] = scale * probs[j] * (grad[j] - dot);
}

static float dot_scalar(const float *a, const float *b, int count) {
    float sum = 0.0f;
    for (int c = 0; c < count; c++) sum += a[c] * b[c];
    return sum;
}

#ifdef HAVE_X86
AVX2 static float horizontal_sum(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

AVX2 static float horizontal_max(__m256 v) {
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
}

AVX2 static float softmax_row_avx2(float *row, int count) {
    const int whole = count / 8 * 8;
    float top = row[0];
    if (whole) {
        __m256 best = _mm256_loadu_ps(row);
        for (int j = 8; j < whole; j += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(row + j));
        top = horizontal_max(best);
    }
    for (int j = whole; j < count; j++) top = row[j] > top ? row[j] : top;
    const __m256 shift = _mm256_set1_ps(top);
    __m256 total = _mm256_setzero_ps();
    for (int j = 0; j < whole; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift));
        _mm256_storeu_ps(row + j, e);
        total = _mm256_add_ps(total, e);
    }
    float sum = horizontal_sum(total) + exp_shifted_scalar(row, whole, count, top);
    const float inverse = 1.0f / sum;
    const __m256 scale = _mm256_set1_ps(inverse);
    for (int j = 0; j < whole; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), scale));
    for (int j = whole; j < count; j++) row[j] *= inverse;
    return top + logf(sum);
}

AVX2 static void exp_shifted_avx2(float *row, int count, float shift) {
    const int whole = count / 8 * 8;
    const __m256 offset = _mm256_set1_ps(shift);
    for (int j = 0; j < whole; j += 8) _mm256_storeu_ps(row + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), offset)));
    exp_shifted_scalar(row, whole, count, shift);
}

AVX2 static float dot_avx2(const float *a, const float *b, int count) {
    const int whole = count / 8 * 8;
    __m256 total = _mm256_setzero_ps();
    for (int c = 0; c < whole; c += 8) total = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), total);
    return horizontal_sum(total) + dot_scalar(a + whole, b + whole, count - whole);
}

AVX2 static void score_gradient_avx2(const float *probs, float *grad, int count, float dot, float scale) {
    const int whole = count / 8 * 8;
    const __m256 d = _mm256_set1_ps(dot), s = _mm256_set1_ps(scale);
    for (int j = 0; j < whole; j += 8) {
        __m256 g = _mm256_sub_ps(_mm256_loadu_ps(grad + j), d);
        _mm256_storeu_ps(grad + j, _mm256_mul_ps(_mm256_mul_ps(s, _mm256_loadu_ps(probs + j)), g));
    }
    score_gradient_scalar(probs, grad, whole, count, dot, scale);
}
#endif

static float softmax_row(float *row, int count) {
#ifdef HAVE_X86
    if (vectorized) return softmax_row_avx2(row, count);
#endif
    return softmax_row_scalar(row, count);
}

static void exp_shifted(float *row, int count, float shift) {
#ifdef HAVE_X86
    if (vectorized) {
        exp_shifted_avx2(row, count, shift);
        return;
    }
#endif
    exp_shifted_scalar(row, 0, count, shift);
}

static void score_gradient(const float *probs, float *grad, int count, const float *out, const float *grad_out,
                           int width, float scale) {
#ifdef HAVE_X86
    if (vectorized) {
        score_gradient_avx2(probs, grad, count, dot_avx2(out, grad_out, width), scale);
        return;
    }
#endif
    score_gradient_scalar(probs, grad, 0, count, dot_scalar(out, grad_out, width), scale);
}

struct shape {
    int batch, tokens, heads, width;
    float scale;
};

/* Pointers into one (image, head) pair's slices of a (batch, tokens, 3, heads, width) buffer. */
static const float *part(const float *qkv, const struct shape *s, int image, int head, int which) {
    return qkv + (((size_t)image * s->tokens * 3 + which) * s->heads + head) * s->width;
}

static void forward_pair(const struct shape *s, int image, int head, const float *qkv, float *out, float *lse,
                         float *scores) {
    const int n = s->tokens, d = s->width, ld = 3 * s->heads * d, ld_out = s->heads * d;
    const float *q = part(qkv, s, image, head, 0), *k = part(qkv, s, image, head, 1), *v = part(qkv, s, image, head, 2);
    float *o = out + ((size_t)image * n * s->heads + head) * d;
    float *row_lse = lse + ((size_t)image * s->heads + head) * n;
    mm_nt(n, n, d, s->scale, q, ld, k, ld, 0.0f, scores, n);
    for (int i = 0; i < n; i++) row_lse[i] = softmax_row(scores + (size_t)i * n, n);
    mm_nn(n, d, n, 1.0f, scores, n, v, ld, o, ld_out);
}

static void backward_pair(const struct shape *s, int image, int head, const float *qkv, const float *out,
                          const float *grad_out, const float *lse, float *grad_qkv, float *probs, float *grad_scores) {
    const int n = s->tokens, d = s->width, ld = 3 * s->heads * d, ld_out = s->heads * d;
    const float *q = part(qkv, s, image, head, 0), *k = part(qkv, s, image, head, 1), *v = part(qkv, s, image, head, 2);
    float *dq = (float *)part(grad_qkv, s, image, head, 0), *dk = (float *)part(grad_qkv, s, image, head, 1),
          *dv = (float *)part(grad_qkv, s, image, head, 2);
    size_t offset = ((size_t)image * n * s->heads + head) * d;
    const float *o = out + offset, *dout = grad_out + offset;
    const float *row_lse = lse + ((size_t)image * s->heads + head) * n;

    mm_nt(n, n, d, s->scale, q, ld, k, ld, 0.0f, probs, n);
    for (int i = 0; i < n; i++) exp_shifted(probs + (size_t)i * n, n, row_lse[i]);
    mm_tn(n, d, n, 1.0f, probs, n, dout, ld_out, dv, ld);            /* dV = P^T dO */
    mm_nt(n, n, d, 1.0f, dout, ld_out, v, ld, 0.0f, grad_scores, n); /* dP = dO V^T */
    for (int i = 0; i < n; i++) {
        score_gradient(probs + (size_t)i * n, grad_scores + (size_t)i * n, n, o + (size_t)i * ld_out,
                       dout + (size_t)i * ld_out, d, s->scale);
    }
    mm_nn(n, d, n, 1.0f, grad_scores, n, k, ld, dq, ld); /* dQ = scale dS K */
    mm_tn(n, d, n, 1.0f, grad_scores, n, q, ld, dk, ld); /* dK = scale dS^T Q */
}

/* Runs every (image, head) pair over `threads` OpenMP threads, each with two tokens x tokens scratch matrices.
 * Returns 0 if scratch memory ran out. */
static int run_pairs(const struct shape *s, int threads, const float *qkv, float *out, float *lse,
                     const float *grad_out, float *grad_qkv) {
    const int pairs = s->batch * s->heads;
    const size_t scratch = (size_t)s->tokens * s->tokens;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        /* Each thread's products run on that thread alone: MKL would otherwise split every small product again. */
        int previous = set_local_threads(1);
        float *a = malloc(2 * scratch * sizeof(float));
        if (a == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int p = 0; p < pairs; p++) {
            if (a == NULL) continue;
            int image = p / s->heads, head = p % s->heads;
            if (grad_out == NULL) forward_pair(s, image, head, qkv, out, lse, a);
            else backward_pair(s, image, head, qkv, out, grad_out, lse, grad_qkv, a, a + scratch);
        }
        free(a);
        set_local_threads(previous);
    }
    return !failed;
}

/* Views each object as a C-contiguous float32 buffer of the given element count (writable where asked). */
static int get_buffers(PyObject **objects, const Py_ssize_t *counts, const int *writable, Py_buffer *views, int n) {
    for (int k = 0; k < n; k++) {
        int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable[k] ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(objects[k], &views[k], flags) < 0) {
            for (int j = 0; j < k; j++) PyBuffer_Release(&views[j]);
            return 0;
        }
        const char *format = views[k].format ? views[k].format : "B";
        int is_float = views[k].itemsize == 4 && (strcmp(format, "f") == 0 || strcmp(format, "=f") == 0 ||
                                                  strcmp(format, "<f") == 0);
        if (!is_float || views[k].len != counts[k] * 4) {
            for (int j = 0; j <= k; j++) PyBuffer_Release(&views[j]);
            PyErr_Format(PyExc_ValueError, "buffer %d: expected %zd contiguous float32 values", k, counts[k]);
            return 0;
        }
    }
    return 1;
}

static int parse_shape(struct shape *s) {
    if (sgemm == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no sgemm bound: call bind(address) first");
        return 0;
    }
    if (s->batch < 1 || s->tokens < 1 || s->heads < 1 || s->width < 1) {
        PyErr_SetString(PyExc_ValueError, "batch, tokens, heads and width must be positive");
        return 0;
    }
    return 1;
}

static PyObject *forward(PyObject *self, PyObject *args) {
    (void)self;
    struct shape s;
    int threads;
    PyObject *objects[3];
    Py_buffer views[3];
    if (!PyArg_ParseTuple(args, "OOOiiiifi", &objects[0], &objects[1], &objects[2], &s.batch, &s.tokens, &s.heads,
                          &s.width, &s.scale, &threads) || !parse_shape(&s)) {
        return NULL;
    }
    Py_ssize_t rows = (Py_ssize_t)s.batch * s.tokens * s.heads;
    Py_ssize_t counts[3] = {3 * rows * s.width, rows * s.width, rows};
    int writable[3] = {0, 1, 1};
    if (!get_buffers(objects, counts, writable, views, 3)) return NULL;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = run_pairs(&s, threads < 1 ? 1 : threads, views[0].buf, views[1].buf, views[2].buf, NULL, NULL);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 3; k++) PyBuffer_Release(&views[k]);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *backward(PyObject *self, PyObject *args) {
    (void)self;
    struct shape s;
    int threads;
    PyObject *objects[5];
    Py_buffer views[5];
    if (!PyArg_ParseTuple(args, "OOOOOiiiifi", &objects[0], &objects[1], &objects[2], &objects[3], &objects[4],
                          &s.batch, &s.tokens, &s.heads, &s.width, &s.scale, &threads) || !parse_shape(&s)) {
        return NULL;
    }
    Py_ssize_t rows = (Py_ssize_t)s.batch * s.tokens * s.heads;
    Py_ssize_t counts[5] = {3 * rows * s.width, rows * s.width, rows * s.width, rows, 3 * rows * s.width};
    int writable[5] = {0, 0, 0, 0, 1};
    if (!get_buffers(objects, counts, writable, views, 5)) return NULL;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = run_pairs(&s, threads < 1 ? 1 : threads, views[0].buf, (float *)views[1].buf, (float *)views[3].buf,
                   views[2].buf, views[4].buf);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 5; k++) PyBuffer_Release(&views[k]);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *bind(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long gemm_address, threads_address;
    if (!PyArg_ParseTuple(args, "KK", &gemm_address, &threads_address)) return NULL;
    if (gemm_address == 0 || threads_address == 0) {
        PyErr_SetString(PyExc_ValueError, "null function address");
        return NULL;
    }
    sgemm = (sgemm_fn)(uintptr_t)gemm_address;
    set_local_threads = (set_threads_fn)(uintptr_t)threads_address;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS, "bind(sgemm, set_local_threads): addresses of MKL's LP64 Fortran sgemm_ and C MKL_Set_Num_Threads_Local"},
    {"forward", forward, METH_VARARGS,
     "forward(qkv, out, lse, batch, tokens, heads, width, scale, threads): out and lse from qkv"},
    {"backward", backward, METH_VARARGS,
     "backward(qkv, out, grad_out, lse, grad_qkv, batch, tokens, heads, width, scale, threads): grad_qkv"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_attention", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cpu_attention(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    vectorized = avx2_available();
    if (PyModule_AddIntConstant(m, "vectorized", vectorized) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
