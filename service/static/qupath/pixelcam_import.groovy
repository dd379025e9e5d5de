/*
 * pixelcam -> QuPath (0.4 or later): bring one analysis of the slide open in QuPath into it.
 *
 *  - the positive regions (annotations, with their area and mean probability) and, when the analysis wrote
 *    them, the tile detections with their class probabilities (Measure > Show measurement maps);
 *  - the pixel heatmap laid over the slide as an overlay, from heatmap-slide.tif: the heatmap in the slide's own
 *    level-0 frame (pixelcam analyze --slide-heatmap, or GET /v1/jobs/{id}/heatmap-slide.tif).
 *
 * Open the slide, set either RESULTS_DIR (a `pixelcam analyze --out` folder) or SERVER + JOB_ID (a finished job
 * of a pixelcam server; API_KEY when it has keys), then Run. Written in plain Groovy that QuPath's script editor
 * runs; the repository checks its syntax and the names it reads (tests/service/test_qupath_script.py).
 */

import qupath.lib.gui.viewer.overlays.BufferedImageOverlay
import qupath.lib.images.servers.ImageServerProvider
import qupath.lib.regions.RegionRequest

import java.awt.image.BufferedImage
import java.nio.file.Files

import static qupath.lib.gui.scripting.QPEx.*

// ---- settings -------------------------------------------------------------------------------------------------
String RESULTS_DIR = ''                     // e.g. '/data/S001.svs.pixelcam'
String SERVER = 'http://127.0.0.1:8000'
String JOB_ID = ''                          // e.g. '5f0c...'; used when RESULTS_DIR is empty
String API_KEY = ''
double OPACITY = 0.6                        // of the heatmap overlay
int MAX_OVERLAY_SIDE = 4096                 // the overlay is read at a downsample that fits this many pixels
boolean IMPORT_DETECTIONS = true            // the tile objects (many on a large slide)
// ---------------------------------------------------------------------------------------------------------------

String GEOJSON_FILE = 'result.geojson'
String HEATMAP_FILE = 'heatmap-slide.tif'

File fetch(String server, String path, String key, File target) {
    def connection = new URL(server + path).openConnection()
    if (key) {
        connection.setRequestProperty('Authorization', 'Bearer ' + key)
    }
    int status = connection.responseCode
    if (status != 200) {
        throw new IOException("GET ${path} answered ${status}: ${connection.errorStream?.text}")
    }
    connection.inputStream.withStream { input -> target.withOutputStream { output -> output << input } }
    return target
}

File folder
if (RESULTS_DIR) {
    folder = new File(RESULTS_DIR)
} else if (JOB_ID) {
    folder = Files.createTempDirectory('pixelcam-' + JOB_ID).toFile()
    fetch(SERVER, "/v1/jobs/${JOB_ID}/geojson", API_KEY, new File(folder, GEOJSON_FILE))
    fetch(SERVER, "/v1/jobs/${JOB_ID}/heatmap-slide.tif?opacity=1", API_KEY, new File(folder, HEATMAP_FILE))
} else {
    throw new IllegalArgumentException('set RESULTS_DIR (a pixelcam analyze --out folder) or SERVER and JOB_ID')
}

def imageServer = getCurrentServer()
if (imageServer == null) {
    throw new IllegalStateException('open the analysed slide in QuPath first')
}

// 1. regions and tile objects (level-0 pixels in QuPath's frame: pixelcam already applied the slide's bounds)
File geojson = new File(folder, GEOJSON_FILE)
if (!geojson.isFile()) {
    throw new FileNotFoundException("${geojson} not found: point RESULTS_DIR at a pixelcam results folder")
}
def objects = importObjectsFromFile(geojson.absolutePath)
if (!IMPORT_DETECTIONS) {
    removeObjects(getDetectionObjects(), true)
}
println "pixelcam: imported ${getAnnotationObjects().size()} annotations, ${getDetectionObjects().size()} detections"

// 2. the heatmap over the slide: its base level is the slide's level 0 / an integer downsample, same frame
File heatmap = new File(folder, HEATMAP_FILE)
if (heatmap.isFile()) {
    def overlayServer = ImageServerProvider.buildServer(heatmap.absolutePath, BufferedImage)
    double downsample = Math.max(1.0d, Math.max(overlayServer.width, overlayServer.height) / (double) MAX_OVERLAY_SIDE)
    def request = RegionRequest.createInstance(overlayServer.path, downsample, 0, 0, overlayServer.width,
            overlayServer.height)
    BufferedImage image = overlayServer.readRegion(request)
    double perPixel = imageServer.width / (double) overlayServer.width
    if (Math.abs(perPixel * overlayServer.height - imageServer.height) > 2 * perPixel) {
        println "pixelcam: ${HEATMAP_FILE} does not have this slide's shape; was it made for another slide?"
    }
    def viewer = getCurrentViewer()
    def overlay = new BufferedImageOverlay(viewer, image)
    overlay.setOpacity(OPACITY)
    viewer.setCustomPixelLayerOverlay(overlay)
    println "pixelcam: heatmap overlay ${image.width} x ${image.height} over ${imageServer.width} x ${imageServer.height}"
} else {
    println "pixelcam: no ${HEATMAP_FILE} in ${folder}; run pixelcam analyze --slide-heatmap for the overlay"
}
