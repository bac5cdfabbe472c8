"""LaPa face-parsing labels, in FaRL's order (what MARLIN's parsing maps hold).

Right/left are the subject's: for a frontal face the subject's right eye (label 4) is on the
image's left.
"""

LAPA_LABELS: tuple[str, ...] = (
    "background",
    "skin",
    "right_eyebrow",
    "left_eyebrow",
    "right_eye",
    "left_eye",
    "nose",
    "upper_lip",
    "inner_mouth",
    "lower_lip",
    "hair",
)
BACKGROUND, SKIN, R_BROW, L_BROW, R_EYE, L_EYE, NOSE, U_LIP, I_MOUTH, L_LIP, HAIR = range(11)
