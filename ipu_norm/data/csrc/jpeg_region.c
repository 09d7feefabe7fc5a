/* Region-of-interest JPEG decoding with libjpeg-turbo: decode only the rows and (iMCU-aligned) columns of a crop,
 * optionally at a DCT scale of M/8, straight into a caller-provided HxWx3 uint8 buffer.
 *
 * - scale (scale_num/8): the IDCT produces the image already downscaled (libjpeg-turbo supports M = 1..16);
 * - columns: jpeg_crop_scanline skips the IDCT, upsampling and colour conversion outside the crop;
 * - rows: jpeg_skip_scanlines skips the IDCT above the crop, and decoding stops after its last row.
 * Entropy (Huffman) decoding of the skipped parts still runs: that is what the format requires.
 *
 * Errors never exit the process: libjpeg's error_exit longjmps back and the function returns non-zero with the
 * message in `msg`. Warnings (e.g. "premature end of data segment") are ignored, as Pillow and torchvision do.
 *
 * libjpeg is not linked: jpeg_region_init() dlopens the library whose header this file was compiled against, by
 * path, privately (RTLD_LOCAL | RTLD_DEEPBIND), and calls it through the table J. Linking -ljpeg would bind to
 * whichever "libjpeg.so.62" the process loaded first: torchvision 0.15 bundles one without jpeg_skip_scanlines.
 */
#include <dlfcn.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

struct region_err {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char *msg;
    int msg_len;
};

static void region_error_exit(j_common_ptr cinfo) {
    struct region_err *err = (struct region_err *)cinfo->err;
    char buffer[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, buffer);
    if (err->msg != NULL && err->msg_len > 0) {
        strncpy(err->msg, buffer, (size_t)err->msg_len - 1);
        err->msg[err->msg_len - 1] = '\0';
    }
    longjmp(err->jump, 1);
}

static void region_output_message(j_common_ptr cinfo) { (void)cinfo; }

static struct {
    struct jpeg_error_mgr *(*std_error)(struct jpeg_error_mgr *);
    void (*create_decompress)(j_decompress_ptr, int, size_t);
    void (*mem_src)(j_decompress_ptr, const unsigned char *, unsigned long);
    int (*read_header)(j_decompress_ptr, boolean);
    boolean (*start_decompress)(j_decompress_ptr);
    void (*crop_scanline)(j_decompress_ptr, JDIMENSION *, JDIMENSION *);
    JDIMENSION (*skip_scanlines)(j_decompress_ptr, JDIMENSION);
    JDIMENSION (*read_scanlines)(j_decompress_ptr, JSAMPARRAY, JDIMENSION);
    void (*abort_decompress)(j_decompress_ptr);
    void (*destroy_decompress)(j_decompress_ptr);
} J;

/* Load libjpeg(-turbo) from `path` and look up the functions used here. Returns 0 on success, 1 when the library
 * cannot be opened, 2 when a function is missing (not libjpeg-turbo >= 1.5). Call once, before any decode. */
int jpeg_region_init(const char *path) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (h == NULL) {
        return 1;
    }
    *(void **)&J.std_error = dlsym(h, "jpeg_std_error");
    *(void **)&J.create_decompress = dlsym(h, "jpeg_CreateDecompress");
    *(void **)&J.mem_src = dlsym(h, "jpeg_mem_src");
    *(void **)&J.read_header = dlsym(h, "jpeg_read_header");
    *(void **)&J.start_decompress = dlsym(h, "jpeg_start_decompress");
    *(void **)&J.crop_scanline = dlsym(h, "jpeg_crop_scanline");
    *(void **)&J.skip_scanlines = dlsym(h, "jpeg_skip_scanlines");
    *(void **)&J.read_scanlines = dlsym(h, "jpeg_read_scanlines");
    *(void **)&J.abort_decompress = dlsym(h, "jpeg_abort_decompress");
    *(void **)&J.destroy_decompress = dlsym(h, "jpeg_destroy_decompress");
    if (!J.std_error || !J.create_decompress || !J.mem_src || !J.read_header || !J.start_decompress ||
        !J.crop_scanline || !J.skip_scanlines || !J.read_scanlines || !J.abort_decompress || !J.destroy_decompress) {
        J.std_error = NULL;
        return 2;
    }
    return 0;
}

/* The error manager of one call: libjpeg's defaults, errors longjmp back with their message in msg. */
static struct jpeg_error_mgr *region_error_init(struct region_err *err, char *msg, int msg_len) {
    struct jpeg_error_mgr *mgr = J.std_error(&err->pub);
    err->pub.error_exit = region_error_exit;
    err->pub.output_message = region_output_message;
    err->msg = msg;
    err->msg_len = msg_len;
    return mgr;
}

/* Image size and colour components from the header: info[0] = width, info[1] = height, info[2] = components,
 * info[3] = libjpeg's J_COLOR_SPACE of the file. Returns 0 on success. */
int jpeg_region_info(const unsigned char *buf, unsigned long len, int *info, char *msg, int msg_len) {
    struct jpeg_decompress_struct cinfo;
    struct region_err err;
    cinfo.err = region_error_init(&err, msg, msg_len);
    if (setjmp(err.jump)) {
        J.destroy_decompress(&cinfo);
        return 1;
    }
    J.create_decompress(&cinfo, JPEG_LIB_VERSION, sizeof(struct jpeg_decompress_struct));
    J.mem_src(&cinfo, buf, len);
    J.read_header(&cinfo, TRUE);
    info[0] = (int)cinfo.image_width;
    info[1] = (int)cinfo.image_height;
    info[2] = cinfo.num_components;
    info[3] = (int)cinfo.jpeg_color_space;
    J.destroy_decompress(&cinfo);
    return 0;
}

/* Decode the box [x0, x0 + w) x [y0, y0 + h) of the image scaled by scale_num / 8 (box in scaled coordinates) as
 * RGB into out (h rows of w * 3 bytes). libjpeg's defaults otherwise (accurate integer IDCT, fancy upsampling): at
 * scale 8/8 the pixels equal a full decode's but for a few at the window's edges, where the chroma upsampling lacks
 * its neighbour (the fast IDCT and plain upsampling were measured: under 3% faster here, not worth their error).
 * Returns 0 on success, 1 on a libjpeg error (message in msg), 2 when the box does not fit the scaled image or the
 * output is not 3-channel (scaled width and height in dims[0..1]), 3 when out of memory. */
int jpeg_region_decode(const unsigned char *buf, unsigned long len, int scale_num, int x0, int y0, int w, int h,
                       unsigned char *out, int *dims, char *msg, int msg_len) {
    struct jpeg_decompress_struct cinfo;
    struct region_err err;
    unsigned char *volatile row = NULL;
    cinfo.err = region_error_init(&err, msg, msg_len);
    if (setjmp(err.jump)) {
        free(row);
        J.destroy_decompress(&cinfo);
        return 1;
    }
    J.create_decompress(&cinfo, JPEG_LIB_VERSION, sizeof(struct jpeg_decompress_struct));
    J.mem_src(&cinfo, buf, len);
    J.read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = (unsigned int)scale_num;
    cinfo.scale_denom = 8;
    J.start_decompress(&cinfo);
    dims[0] = (int)cinfo.output_width;
    dims[1] = (int)cinfo.output_height;
    if (x0 < 0 || y0 < 0 || w < 1 || h < 1 || (JDIMENSION)(x0 + w) > cinfo.output_width ||
        (JDIMENSION)(y0 + h) > cinfo.output_height || cinfo.output_components != 3) {
        J.destroy_decompress(&cinfo);
        return 2;
    }
    JDIMENSION xoff = (JDIMENSION)x0, cw = (JDIMENSION)w;
    if (cw < cinfo.output_width) {
        J.crop_scanline(&cinfo, &xoff, &cw); /* widens the window to iMCU boundaries */
    }
    if (y0 > 0) {
        J.skip_scanlines(&cinfo, (JDIMENSION)y0);
    }
    size_t shift = (size_t)(x0 - (int)xoff) * 3;
    if (shift == 0 && cw == (JDIMENSION)w) {
        for (int r = 0; r < h;) {
            JSAMPROW dst = out + (size_t)r * (size_t)w * 3;
            r += (int)J.read_scanlines(&cinfo, &dst, 1);
        }
    } else {
        row = (unsigned char *)malloc((size_t)cw * 3);
        if (row == NULL) {
            J.destroy_decompress(&cinfo);
            return 3;
        }
        for (int r = 0; r < h;) {
            JSAMPROW dst = row;
            if (J.read_scanlines(&cinfo, &dst, 1) == 1) {
                memcpy(out + (size_t)r * (size_t)w * 3, row + shift, (size_t)w * 3);
                r++;
            }
        }
        free(row);
        row = NULL;
    }
    J.abort_decompress(&cinfo); /* the rows below the box are never decoded */
    J.destroy_decompress(&cinfo);
    return 0;
}
