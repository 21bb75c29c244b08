/* exp on 8 floats at once with AVX2/FMA, for vitkit's C kernels, and the run-time check that the CPU has it.
 *
 * exp(z) = 2^n e^r with z = n ln2 + r, |r| <= ln(2)/2; e^r by its degree-7 Taylor polynomial, whose truncation
 * error (5e-9) is below a float's rounding. z is clamped to [-87, 88] so that 2^n stays a normal float.
 */
#ifndef VITKIT_AVX2_EXP_H
#define VITKIT_AVX2_EXP_H

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#define AVX2 __attribute__((target("avx2,fma")))

static const float kExpLow = -87.0f;
static const float kExpHigh = 88.0f;

AVX2 static inline __m256 exp8(__m256 z) {
    z = _mm256_min_ps(_mm256_max_ps(z, _mm256_set1_ps(kExpLow)), _mm256_set1_ps(kExpHigh));
    /* ln2 in two parts so that n * ln2 is exact to float precision. */
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
#endif

static inline int avx2_available(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

#endif
