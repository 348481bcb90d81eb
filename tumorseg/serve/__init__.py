"""``tumorseg serve``: a DICOM node that receives studies from the PACS and sends contours back.

A service over :mod:`tumorseg.pipeline`, never reaching into a stage: ``config`` reads and checks
the node file, ``spool`` stores received instances durably under validated UIDs, ``state`` keeps
each study's job in SQLite, ``node`` runs the storage SCP, the worker and the sender. Receiving
imports neither torch nor the pipeline; the worker loads them once. docs/serve.md.
"""
