"""The ops a model calls, behind one backend chosen when the runner starts: compiled CPU kernels
(C++ called through ctypes) or torch."""
