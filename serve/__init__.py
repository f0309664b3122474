"""``radixpert-serve``: a DICOM node that receives radiographs, queues them durably, writes draft
reports with one model load and sends the coded SR back (docs/serve.md)."""
