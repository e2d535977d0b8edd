"""Audio I/O and the fixed front-end constants of LAION-CLAP (HTSAT / PANN, 48 kHz).

Every other module imports these constants; none re-types a number.
"""
from __future__ import annotations

SAMPLE_RATE = 48_000          # Hz, LAION-CLAP's input rate
CLIP_SECONDS = 10             # s, one model window
CLIP_SAMPLES = CLIP_SECONDS * SAMPLE_RATE   # 480 000 samples per window
N_FFT = 1024                  # samples, STFT size and Hann window length
HOP = 480                     # samples between STFT frames (10 ms)
N_FREQS = N_FFT // 2 + 1      # 513 linear-frequency bins
N_MELS = 64                   # mel bands (Slaney scale and norm)
F_MIN = 50                    # Hz, lowest mel edge
F_MAX = 14_000                # Hz, highest mel edge
N_FRAMES = CLIP_SAMPLES // HOP + 1          # 1001 frames per window (centre padding)

assert CLIP_SAMPLES % HOP == 0, "a window must hold a whole number of hops"
