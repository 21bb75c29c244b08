/* Decoding one rectangle of a JPEG with libjpeg-turbo, for RandomResizedCrop.
 *
 * Pillow and torchvision decode every pixel of a JPEG, although a random resized crop keeps on average about
 * half of them. libjpeg-turbo can skip the rows above a region (jpeg_skip_scanlines: entropy decoding only, no
 * inverse DCT, upsampling or colour conversion), stop after its last row, and convert only the columns of the
 * iMCUs that cover it (jpeg_crop_scanline). The region's pixels are the ones a full decode gives.
 *
 * decode_region(data, left, top, width, height) -> bytearray of height * width * 3 bytes, interleaved RGB (the
 * layout libjpeg writes; torch's uint8 resize is fastest on it, as a channels-last view), or None when the stream is
 * not a complete YCbCr/greyscale JPEG, is a progressive file missing scans, has a marker where only entropy-coded
 * data may be, or libjpeg reports any error or warning: the caller then takes the full decoder, which decodes it or
 * reports what is wrong in its own words. A box outside 0..65500 pixels is a ValueError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

struct abort_on_problem {
    struct jpeg_error_mgr base;
    jmp_buf escape;
};

static void leave_on_error(j_common_ptr cinfo) {
    longjmp(((struct abort_on_problem *)cinfo->err)->escape, 1);
}

/* Warnings (corrupt or truncated data) abort too: libjpeg would fill the gap with grey, where the plain path
 * reports the file. Trace messages (level > 0) are ignored. */
static void leave_on_warning(j_common_ptr cinfo, int msg_level) {
    if (msg_level < 0) {
        longjmp(((struct abort_on_problem *)cinfo->err)->escape, 1);
    }
}

static void silence(j_common_ptr cinfo) { (void)cinfo; }

/* Every error and warning jumps to problem->escape, which the caller sets with setjmp in its own frame. */
static void use_abort_on_problem(j_decompress_ptr cinfo, struct abort_on_problem *problem) {
    cinfo->err = jpeg_std_error(&problem->base);
    problem->base.error_exit = leave_on_error;
    problem->base.emit_message = leave_on_warning;
    problem->base.output_message = silence;
}

/* YCbCr and grey JPEGs convert to RGB alike in every decoder; CMYK/YCCK ones do not, so the full decoder takes them. */
static int is_served_colour_space(j_decompress_ptr cinfo) {
    return cinfo->jpeg_color_space == JCS_YCbCr || cinfo->jpeg_color_space == JCS_GRAYSCALE;
}

/* An incomplete progressive file (scans missing) is decoded with block smoothing, which reaches two blocks sideways,
 * beyond the crop margin, and differs between libjpeg-turbo versions: the full decoder takes such files. */
static int is_block_smoothed(j_decompress_ptr cinfo) {
    if (!cinfo->progressive_mode || !cinfo->do_block_smoothing) {
        return 0;
    }
    for (int component = 0; component < cinfo->num_components; component++) {
        for (int k = 0; k < DCTSIZE2; k++) {
            if (cinfo->coef_bits[component][k] != 0) {
                return 1;
            }
        }
    }
    return 0;
}

/* In a single-scan file everything after the scan header is entropy-coded data up to the final EOI, where 0xFF is
 * followed only by 0x00 (stuffing), 0xFF (fill) or an RSTn marker. A region decode stops at the region's last row,
 * so a stray marker below it, which the full decoders refuse, has to be looked for here. */
static int only_entropy_data_follows(j_decompress_ptr cinfo, const unsigned char *data, size_t size) {
    int marker = cinfo->unread_marker;
    if (marker != 0 && !(marker >= 0xD0 && marker <= 0xD7) && marker != 0xD9) {
        return 0;
    }
    const unsigned char *end = data + size - 2; /* the final EOI, checked by the caller */
    for (const unsigned char *p = cinfo->src->next_input_byte; p < end; p++) {
        p = memchr(p, 0xFF, (size_t)(end - p));
        if (p == NULL) {
            break;
        }
        unsigned char next = p[1];
        if (next != 0x00 && next != 0xFF && (next < 0xD0 || next > 0xD7)) {
            return 0;
        }
    }
    return 1;
}

/* Decodes rows [top, top + height) and columns [left, left + width) into pixels; 0 on success. */
static int decode_into(const unsigned char *data, size_t size, JDIMENSION left, JDIMENSION top,
                       JDIMENSION width, JDIMENSION height, unsigned char *pixels) {
    struct jpeg_decompress_struct cinfo;
    struct abort_on_problem problem;
    /* volatile: changed between setjmp and a possible longjmp */
    JSAMPLE *volatile row = NULL;

    /* A region decode stops at the region's last row, so it would not notice a file cut short below it, which the
     * full decoder refuses. A complete JPEG ends with the EOI marker (0xFF 0xD9 cannot occur inside entropy-coded
     * data); anything else, trailing bytes included, goes to the full decoder. */
    if (size < 4 || data[size - 2] != 0xFF || data[size - 1] != 0xD9) {
        return -1;
    }
    use_abort_on_problem(&cinfo, &problem);
    if (setjmp(problem.escape)) {
        jpeg_destroy_decompress(&cinfo);
        free(row);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    if (!is_served_colour_space(&cinfo)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if ((size_t)left + width > cinfo.image_width || (size_t)top + height > cinfo.image_height) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    cinfo.out_color_space = JCS_RGB;
    jpeg_start_decompress(&cinfo);
    /* A multi-scan file has been read to its end by now; a single-scan one is checked to its end. */
    if (cinfo.output_components != 3 || is_block_smoothed(&cinfo) ||
        (!jpeg_input_complete(&cinfo) && !only_entropy_data_follows(&cinfo, data, size))) {
        longjmp(problem.escape, 1);
    }

    /* Fancy upsampling of subsampled chroma treats a crop's side as the image's edge, which changes the pixels
     * next to it; one iMCU of margin on each side keeps the region's pixels those of the full decode.
     * jpeg_crop_scanline then moves the left side down to an iMCU boundary and may widen the crop. */
    JDIMENSION margin = (JDIMENSION)cinfo.max_h_samp_factor * DCTSIZE;
    JDIMENSION crop_left = left > margin ? left - margin : 0;
    JDIMENSION crop_right = left + width + margin < cinfo.output_width ? left + width + margin : cinfo.output_width;
    JDIMENSION crop_width = crop_right - crop_left;
    jpeg_crop_scanline(&cinfo, &crop_left, &crop_width);
    if (top > 0 && jpeg_skip_scanlines(&cinfo, top) != top) {
        longjmp(problem.escape, 1);
    }
    row = malloc((size_t)crop_width * 3);
    if (row == NULL) {
        longjmp(problem.escape, 1);
    }
    size_t skip = (size_t)(left - crop_left) * 3, stride = (size_t)width * 3;
    for (JDIMENSION y = 0; y < height; y++) {
        JSAMPROW rows[1] = {row};
        if (jpeg_read_scanlines(&cinfo, rows, 1) != 1) {
            longjmp(problem.escape, 1);
        }
        memcpy(pixels + y * stride, row + skip, stride);
    }
    /* The rows below the region are never decoded: abort rather than finish. */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    free(row);
    return 0;
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    Py_ssize_t left, top, width, height;
    if (!PyArg_ParseTuple(args, "y*nnnn", &data, &left, &top, &width, &height)) {
        return NULL;
    }
    if (left < 0 || top < 0 || width < 1 || height < 1 || left + width > JPEG_MAX_DIMENSION ||
        top + height > JPEG_MAX_DIMENSION) {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "the region must have a positive size and lie within %d x %d pixels",
                     (int)JPEG_MAX_DIMENSION, (int)JPEG_MAX_DIMENSION);
        return NULL;
    }
    PyObject *pixels = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)3 * width * height);
    if (pixels == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyByteArray_AS_STRING(pixels);
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = decode_into(data.buf, (size_t)data.len, (JDIMENSION)left, (JDIMENSION)top, (JDIMENSION)width,
                         (JDIMENSION)height, out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (failed) {
        Py_DECREF(pixels);
        Py_RETURN_NONE;
    }
    return pixels;
}

/* The image size from the header alone (no pixel decoded), for drawing a crop box before decoding. */
static int read_size(const unsigned char *data, size_t size, JDIMENSION *width, JDIMENSION *height) {
    struct jpeg_decompress_struct cinfo;
    struct abort_on_problem problem;
    use_abort_on_problem(&cinfo, &problem);
    if (setjmp(problem.escape)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    int served = is_served_colour_space(&cinfo);
    *width = cinfo.image_width;
    *height = cinfo.image_height;
    jpeg_destroy_decompress(&cinfo);
    return served ? 0 : -1;
}

static PyObject *jpeg_size(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data)) {
        return NULL;
    }
    JDIMENSION width = 0, height = 0;
    /* Fewer bytes than an SOI and one marker, or no 0xFF first, is no JPEG: no need to set libjpeg up for it. */
    int failed = data.len < 4 || ((const unsigned char *)data.buf)[0] != 0xFF ||
                 read_size(data.buf, (size_t)data.len, &width, &height);
    PyBuffer_Release(&data);
    if (failed) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(II)", width, height);
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, left, top, width, height) -> interleaved RGB bytearray (height * width * 3), or None"},
    {"jpeg_size", jpeg_size, METH_VARARGS,
     "jpeg_size(data) -> (width, height) of a YCbCr or greyscale JPEG, which decode_region can serve, else None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_jpeg_region", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
