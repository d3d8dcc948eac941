"""Where the pipeline's images come from: the VisDrone converter and the synthetic generator that
writes scenes in VisDrone's raw format."""
