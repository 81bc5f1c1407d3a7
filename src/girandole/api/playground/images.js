// Images in chat, for a model that takes them (/v1/models' supports_image_input): the composer's
// "Attach image" control, an image pasted into the message box or dropped on it; the pending
// images' thumbnails (each removable) and a sent message's; the content parts a user message
// with images sends. Loaded before app.js, whose helpers ($, showError, currentModel) these
// functions call when they run.
"use strict";

// One image file at most, as the server reads it (girandole/api/serving/images.py)
const MAX_IMAGE_BYTES = 20 * 1024 * 1024;

// The images the next user message takes: {url: a data: URL, name}.
const pendingImages = [];

function imagesAllowed() {
  const model = currentModel();
  return Boolean(model && model.supports_image_input);
}

// A message's content as chat sends it: its text alone, or with images, parts (the text first).
function messageContent(text, images) {
  if (!images || !images.length) return text;
  const parts = text.trim() ? [{ type: "text", text }] : [];
  for (const image of images) parts.push({ type: "image_url", image_url: { url: image.url } });
  return parts;
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// Add `files` to the pending images: one that is no image, or too big, is refused with a message
// saying why (the others are added).
async function attachFiles(files) {
  const refused = [];
  for (const file of files) {
    const name = file.name || "pasted image";
    if (!file.type.startsWith("image/")) {
      refused.push(`${name} is not an image (${file.type || "unknown type"})`);
    } else if (file.size > MAX_IMAGE_BYTES) {
      const mb = (file.size / (1024 * 1024)).toFixed(1);
      refused.push(`${name} is ${mb} MB: an image may be at most 20 MB (the server's limit)`);
    } else {
      try {
        pendingImages.push({ url: await readDataURL(file), name });
      } catch (err) {
        refused.push(`${name} could not be read (${err.message})`);
      }
    }
  }
  renderPendingImages();
  if (refused.length) showError(`Not attached: ${refused.join("; ")}`);
}

// The image files of a paste or a drop (none when the model takes no images).
function imageFiles(transfer) {
  if (!transfer || !imagesAllowed()) return [];
  return Array.from(transfer.files || []);
}

function thumbnail(image, remove) {
  const figure = document.createElement("figure");
  figure.className = "thumb";
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = image.name;
  img.title = image.name;
  figure.append(img);
  if (remove) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "remove-image";
    b.textContent = "×";
    b.title = `Remove ${image.name}`;
    b.setAttribute("aria-label", b.title);
    b.addEventListener("click", remove);
    figure.append(b);
  }
  return figure;
}

// The pending images above the message box, each with its × (the focus goes to the box after).
function renderPendingImages() {
  const box = $("attachments");
  box.replaceChildren(...pendingImages.map((image, k) => thumbnail(image, () => {
    pendingImages.splice(k, 1);
    renderPendingImages();
    $("input").focus();
  })));
  box.hidden = !pendingImages.length;
}

// A sent message's images, shown in it.
function messageImages(m) {
  const box = document.createElement("div");
  box.className = "thumbs";
  box.append(...m.images.map((image) => thumbnail(image, null)));
  return box;
}

// The control shows for a model that takes images; pending images stay shown (removable)
// whatever the model.
function imageControlsChanged() {
  $("attach-button").hidden = !imagesAllowed();
  renderPendingImages();
}

// A message's images as an import gives them: those with a URL (a file written by hand may hold
// anything there); undefined when none.
function importedImages(images) {
  if (!Array.isArray(images)) return undefined;
  const kept = images.filter((image) => image && typeof image.url === "string")
    .map((image) => ({ url: image.url, name: String(image.name ?? "image") }));
  return kept.length ? kept : undefined;
}

// A request as View code shows it: each data: URL cut short (the request sent has them whole).
function shortenDataURLs(value) {
  if (typeof value === "string") {
    return value.startsWith("data:") && value.length > 80
      ? `${value.slice(0, 48)}…(${value.length} characters)` : value;
  }
  if (Array.isArray(value)) return value.map(shortenDataURLs);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, shortenDataURLs(v)]));
  }
  return value;
}

function initImages() {
  // a label for its hidden file input, as Import: Enter or Space opens the file chooser
  $("attach-button").addEventListener("keydown", (event) => {
    if (event.key !== "Enter" && event.key !== " ") return;
    event.preventDefault();
    $("attach").click();
  });
  $("attach").addEventListener("change", (event) => {
    const files = Array.from(event.target.files);
    event.target.value = "";
    attachFiles(files);
  });
  $("input").addEventListener("paste", (event) => {
    const files = imageFiles(event.clipboardData);
    if (!files.length) return; // text pastes as text
    event.preventDefault();
    attachFiles(files);
  });
  $("input").addEventListener("dragover", (event) => {
    if (imagesAllowed() && event.dataTransfer.types.includes("Files")) event.preventDefault();
  });
  $("input").addEventListener("drop", (event) => {
    const files = imageFiles(event.dataTransfer);
    if (!files.length) return;
    event.preventDefault();
    attachFiles(files);
  });
}
