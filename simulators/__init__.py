"""Line simulators: the same wire protocols as the real devices, for commissioning a config on a desk."""
