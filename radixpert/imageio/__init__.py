"""Read a chest radiograph (DICOM or PNG) into the model's input.

Everything here uses numpy, pydicom and Pillow only: this module must never
import torch, because it runs on the offline GPU workstation that has none.

Pipeline, in this order
-----------------------
DICOM:

1. Decode the stored values (``ds.pixel_array``): native and RLE by pydicom,
   JPEG 2000 through the pylibjpeg + openjpeg plugin.
2. Modality LUT: *Rescale Slope* / *Rescale Intercept* when both are present
   (as pydicom does), or the *Modality LUT Sequence*.
3. VOI: the *VOI LUT Sequence* when present (pydicom's default preference),
   else the first *Window Center* / *Window Width* pair with the *VOI LUT
   Function* (LINEAR, the default, LINEAR_EXACT or SIGMOID; PS3.3 C.11.2.1),
   else none. A VOI LUT is scaled by its own output range ``0..2**bits - 1``;
   with no VOI the values are scaled over the range they *could* take
   (from *Bits Stored*, *Pixel Representation* and the rescale), never by
   the image's own min/max, so the same stored value always gives the same
   brightness.
4. MONOCHROME1 inversion ``1 - y``, after the VOI, so that bright = dense.
5. Pixel padding: stored values equal to *Pixel Padding Value* (0028,0120),
   or with *Pixel Padding Range Limit* (0028,0121) inside the inclusive range
   between the two (both in stored units, before the modality LUT), are set
   to 0, black, after the inversion. Black is the darkest display level in
   both photometric interpretations: PS3.3 puts MONOCHROME2 padding at the low
   end of the stored range and MONOCHROME1 padding at the high end, i.e. at
   the end each one displays as black, and a black surround is also what the
   letterbox adds. Padding never takes part in the VOI: no window is derived
   from the pixels here, and the one pixel statistic taken (the "looks flat"
   warning) skips padding, so collimator padding written as a bright value is
   not shown as dense anatomy.

   The result is the float32 *display* image in [0, 1].

   Steps 2-5 are a pure function of the stored value, so they are evaluated
   once, in float64, for every value between the image's min and max, and
   the image is then gathered from that float32 table. This is exact to
   float32 rounding against pydicom's ``apply_modality_lut`` +
   ``apply_voi_lut`` (the tests prove it) and several times faster.

   Images marked "FOR PRESENTATION" get the VOI their header stores, like any
   other: that flag says processing is done, not that the window is applied.
   "FOR PROCESSING" (raw detector) images are read the same way with a
   warning. *Presentation LUT Shape* is not applied: for radiographs it only
   restates the photometric interpretation (INVERSE goes with MONOCHROME1),
   so a disagreement between the two is reported as a warning and the
   photometric interpretation wins.

PNG (PadChest style): ``display = value / 65535`` for 16-bit and
``value / 255`` for 8-bit grayscale. An RGB(A) or palette PNG is refused as
colour unless all its colour channels are equal, then one is taken.

Model input (both sources):

6. Letterbox to a square: the shorter side is padded symmetrically with 0
   (black, the background of a radiograph; an odd extra pixel goes to the
   bottom/right). The aspect ratio is kept because anatomy (heart width
   against chest width) is what the report is about; stretching would fake
   cardiomegaly or hide it.
7. Resize to ``size`` x ``size`` (default 224) with Pillow's BOX filter on a
   float32 ("F") image: when shrinking this is an exact area average, so
   there is no aliasing and mask coverage stays a true fraction. (An image
   smaller than ``size`` is enlarged by the same filter, which then acts
   almost like nearest neighbour.)
8. ImageNet normalization, the gray image replicated to 3 channels:
   float32 ``(3, size, size)``.

Steps 6-7 are :func:`letterbox_resize`, which masks go through too.

Policies (refusals raise :class:`~radixpert.errors.InputError`, one line)
-------------------------------------------------------------------------
* Multi-frame (*Number of Frames* > 1): refused. A chest radiograph is one
  frame; silently taking the first frame of a tomosynthesis or dual-energy
  series would report on the wrong image.
* Modality: CR, DX, DR and RG are read. Cross-sectional and other
  non-radiograph modalities (CT, MR, PT, NM, US, MG, XA, RF, RT*, SR, ...;
  see ``REFUSED_MODALITIES``) are refused. A missing, OT or unfamiliar
  modality is read with a warning, as is a *Body Part Examined* that is
  present and not chest-like (a missing one is common and not warned about).
* Colour (*Samples per Pixel* != 1, or a photometric interpretation other
  than MONOCHROME1/2), no pixel data, truncated or undecodable pixel data,
  a file that is neither DICOM nor PNG, a missing file: refused.

Modules: ``reader`` (entry points), ``dicom`` (policies, decoding),
``display`` (steps 2-5), ``png``, ``geometry`` (steps 6-8), ``common``.
"""

from __future__ import annotations

from radixpert.imageio.common import MAX_SIDE
from radixpert.imageio.dicom import ACCEPTED_MODALITIES, REFUSED_MODALITIES
from radixpert.imageio.display import dicom_display, pixel_padding
from radixpert.imageio.geometry import (
    DEFAULT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    letterbox_resize,
    normalize_imagenet,
)
from radixpert.imageio.reader import ScanImage, read_display, read_image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_SIZE",
    "MAX_SIDE",
    "ACCEPTED_MODALITIES",
    "REFUSED_MODALITIES",
    "ScanImage",
    "read_display",
    "read_image",
    "dicom_display",
    "pixel_padding",
    "letterbox_resize",
    "normalize_imagenet",
]
