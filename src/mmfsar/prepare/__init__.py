"""Prepare real datasets in the mmfsar layout: ``python -m mmfsar.prepare <command>``.

One module per concern, each usable from Python too:

* :mod:`~mmfsar.prepare.videos`: raw videos -> RGB stream (constant-fps H.264 and/or JPEG
  frames), ``annotations.csv``, ``meta.json``;
* :mod:`~mmfsar.prepare.flow`: optical flow (DIS, Farneback, TV-L1) in parallel, resumable;
* :mod:`~mmfsar.prepare.pose`: keypoints from COCO-style / OpenPose JSON or numpy arrays;
* :mod:`~mmfsar.prepare.splits`: the standard few-shot split lists (CMN, ARN, OTAM);
* :mod:`~mmfsar.prepare.check`: the validator's report on the result.

See DATA_STRUCTURE.md, "Preparing real datasets".
"""

from mmfsar.prepare.common import StageResult
from mmfsar.prepare.flow import FLOW_METHODS, FLOW_STORES, FlowMethod, FlowStore, prepare_flow
from mmfsar.prepare.pose import KEYPOINT_FORMATS, LAYOUTS, KeypointFormat, KeypointLayout, import_pose, register_layout
from mmfsar.prepare.splits import SPLIT_STYLES, import_splits, read_split_file
from mmfsar.prepare.videos import VideoSettings, prepare_videos

__all__ = [
    "FLOW_METHODS",
    "FLOW_STORES",
    "KEYPOINT_FORMATS",
    "LAYOUTS",
    "SPLIT_STYLES",
    "FlowMethod",
    "FlowStore",
    "KeypointFormat",
    "KeypointLayout",
    "StageResult",
    "VideoSettings",
    "import_pose",
    "import_splits",
    "prepare_flow",
    "prepare_videos",
    "read_split_file",
    "register_layout",
]
