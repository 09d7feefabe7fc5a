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
 */
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

/* Image size and colour components from the header: info[0] = width, info[1] = height, info[2] = components,
 * info[3] = libjpeg's J_COLOR_SPACE of the file. Returns 0 on success. */
int jpeg_region_info(const unsigned char *buf, unsigned long len, int *info, char *msg, int msg_len) {
    struct jpeg_decompress_struct cinfo;
    struct region_err err;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = region_error_exit;
    err.pub.output_message = region_output_message;
    err.msg = msg;
    err.msg_len = msg_len;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, buf, len);
    jpeg_read_header(&cinfo, TRUE);
    info[0] = (int)cinfo.image_width;
    info[1] = (int)cinfo.image_height;
    info[2] = cinfo.num_components;
    info[3] = (int)cinfo.jpeg_color_space;
    jpeg_destroy_decompress(&cinfo);
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
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = region_error_exit;
    err.pub.output_message = region_output_message;
    err.msg = msg;
    err.msg_len = msg_len;
    if (setjmp(err.jump)) {
        free(row);
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, buf, len);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = (unsigned int)scale_num;
    cinfo.scale_denom = 8;
    jpeg_start_decompress(&cinfo);
    dims[0] = (int)cinfo.output_width;
    dims[1] = (int)cinfo.output_height;
    if (x0 < 0 || y0 < 0 || w < 1 || h < 1 || (JDIMENSION)(x0 + w) > cinfo.output_width ||
        (JDIMENSION)(y0 + h) > cinfo.output_height || cinfo.output_components != 3) {
        jpeg_destroy_decompress(&cinfo);
        return 2;
    }
    JDIMENSION xoff = (JDIMENSION)x0, cw = (JDIMENSION)w;
    if (cw < cinfo.output_width) {
        jpeg_crop_scanline(&cinfo, &xoff, &cw); /* widens the window to iMCU boundaries */
    }
    if (y0 > 0) {
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
    }
    size_t shift = (size_t)(x0 - (int)xoff) * 3;
    if (shift == 0 && cw == (JDIMENSION)w) {
        for (int r = 0; r < h;) {
            JSAMPROW dst = out + (size_t)r * (size_t)w * 3;
            r += (int)jpeg_read_scanlines(&cinfo, &dst, 1);
        }
    } else {
        row = (unsigned char *)malloc((size_t)cw * 3);
        if (row == NULL) {
            jpeg_destroy_decompress(&cinfo);
            return 3;
        }
        for (int r = 0; r < h;) {
            JSAMPROW dst = row;
            if (jpeg_read_scanlines(&cinfo, &dst, 1) == 1) {
                memcpy(out + (size_t)r * (size_t)w * 3, row + shift, (size_t)w * 3);
                r++;
            }
        }
        free(row);
        row = NULL;
    }
    jpeg_abort_decompress(&cinfo); /* the rows below the box are never decoded */
    jpeg_destroy_decompress(&cinfo);
    return 0;
}
