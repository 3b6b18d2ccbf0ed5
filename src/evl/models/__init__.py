"""Model parts: layers, video and text towers, fusion, evl-specific modules, the composed model."""
