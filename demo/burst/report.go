package burst

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// WriteTable prints one row per run.
func WriteTable(w io.Writer, results []Result) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\tsent\torigin queries\torigin 503s\tclient non-2xx\tclient errors\tp50\tp99\telapsed\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%s\t\n",
			r.Label, r.Sent, r.OriginQueries, r.OriginRejections, r.Non2xx, r.Errors,
			ms(r.P50), ms(r.P99), ms(r.Elapsed))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write table: %w", err)
	}
	return nil
}

func ms(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 1, 64) + " ms"
}

// Chart geometry, in SVG user units.
const (
	panelW   = 460 // one run's column
	marginL  = 64  // room for y tick labels
	marginR  = 24
	plotW    = panelW - marginL - marginR
	plotH    = 170
	headerH  = 70 // overall title and the legend
	titleH   = 62 // a run's name and totals
	chartGap = 56 // x axis labels and the next chart's title
	footerH  = 40
	svgH     = headerH + titleH + 2*plotH + chartGap + footerH
)

// WriteSVG draws, for each run side by side, origin queries per interval as
// bars above client p99 latency per interval as a line. The runs share their
// scales so the columns compare at a glance.
func WriteSVG(w io.Writer, results []Result) error {
	var maxQ int64
	var maxP99, maxT time.Duration
	interval := 100 * time.Millisecond
	for _, r := range results {
		if r.Interval > 0 {
			interval = r.Interval
		}
		maxT = max(maxT, time.Duration(len(r.Intervals))*r.Interval)
		for _, iv := range r.Intervals {
			maxQ = max(maxQ, iv.OriginQueries)
			maxP99 = max(maxP99, iv.P99)
		}
	}
	qStep, qMax := axis(float64(maxQ))
	pStep, pMax := axis(float64(maxP99) / float64(time.Millisecond))
	tStep, tMax := axis(maxT.Seconds())

	width := max(1, len(results)) * panelW
	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n",
		width, svgH, width, svgH)
	fmt.Fprintf(&b, `<rect x="0" y="0" width="%d" height="%d" fill="#ffffff"/>`+"\n", width, svgH)
	text(&b, 16, 24, "start", "16", "bold", "Burst: origin queries and client p99 per "+durLabel(interval))
	fmt.Fprintf(&b, `<rect x="16" y="40" width="12" height="12" fill="#4878a8"/>`+"\n")
	text(&b, 34, 50, "start", "12", "", "origin queries per "+durLabel(interval))
	fmt.Fprintf(&b, `<line x1="200" y1="46" x2="224" y2="46" stroke="#d9622b" stroke-width="2"/>`+"\n")
	text(&b, 230, 50, "start", "12", "", "client p99 (ms) of requests completed in the interval")

	for i, r := range results {
		x0 := float64(i*panelW + marginL)
		y := float64(headerH)
		text(&b, x0, y+18, "start", "14", "bold", r.Label)
		text(&b, x0, y+34, "start", "11", "", fmt.Sprintf("%d sent: %d origin queries, %d origin 503s",
			r.Sent, r.OriginQueries, r.OriginRejections))
		text(&b, x0, y+48, "start", "11", "", fmt.Sprintf("%d client failures, client p50 %s, p99 %s",
			r.Non2xx+r.Errors, ms(r.P50), ms(r.P99)))

		top := y + titleH
		frame(&b, x0, top, qStep, qMax, tStep, tMax, "origin queries")
		for _, iv := range r.Intervals {
			if iv.OriginQueries <= 0 {
				continue
			}
			bx := x0 + iv.Start.Seconds()/tMax*plotW
			bw := math.Max(1, r.Interval.Seconds()/tMax*plotW-1)
			bh := float64(iv.OriginQueries) / qMax * plotH
			fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#4878a8"/>`+"\n",
				bx, top+plotH-bh, bw, bh)
		}

		top += plotH + chartGap
		frame(&b, x0, top, pStep, pMax, tStep, tMax, "client p99 (ms)")
		// One polyline per stretch of intervals that had completions, so an
		// empty interval shows as a gap rather than a fake zero.
		var pts []string
		flush := func() {
			if len(pts) > 0 {
				fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="#d9622b" stroke-width="2"/>`+"\n", strings.Join(pts, " "))
			}
			pts = pts[:0]
		}
		for _, iv := range r.Intervals {
			if iv.Requests == 0 {
				flush()
				continue
			}
			px := x0 + (iv.Start+r.Interval/2).Seconds()/tMax*plotW
			py := top + plotH - float64(iv.P99)/float64(time.Millisecond)/pMax*plotH
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", px, py))
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="2" fill="#d9622b"/>`+"\n", px, py)
		}
		flush()
		text(&b, x0+plotW/2, top+plotH+34, "middle", "11", "", "time since the burst started (s)")
	}
	b.WriteString("</svg>\n")
	if _, err := w.Write(b.Bytes()); err != nil {
		return fmt.Errorf("write svg: %w", err)
	}
	return nil
}

// frame draws a plot's box, grid, tick labels and y axis title.
func frame(b *bytes.Buffer, x0, top, yStep, yMax, tStep, tMax float64, yTitle string) {
	fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="%d" height="%d" fill="#f7f7f7" stroke="#999999"/>`+"\n", x0, top, plotW, plotH)
	for v := 0.0; v <= yMax+yStep/2; v += yStep {
		y := top + plotH - v/yMax*plotH
		fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#dddddd"/>`+"\n", x0, y, x0+plotW, y)
		text(b, x0-6, y+4, "end", "10", "", num(v))
	}
	for t := 0.0; t <= tMax+tStep/2; t += tStep {
		x := x0 + t/tMax*plotW
		fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#999999"/>`+"\n", x, top+plotH, x, top+plotH+4)
		text(b, x, top+plotH+16, "middle", "10", "", num(t))
	}
	text(b, x0-marginL+14, top+plotH/2, "middle", "11", "", yTitle,
		fmt.Sprintf(`transform="rotate(-90 %.1f %.1f)"`, x0-marginL+14, top+plotH/2))
}

// text writes a <text> element with s escaped.
func text(b *bytes.Buffer, x, y float64, anchor, size, weight, s string, extra ...string) {
	fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="%s" font-size="%s"`, x, y, anchor, size)
	if weight != "" {
		fmt.Fprintf(b, ` font-weight="%s"`, weight)
	}
	for _, e := range extra {
		b.WriteString(" " + e)
	}
	b.WriteString(">")
	xml.EscapeText(b, []byte(s))
	b.WriteString("</text>\n")
}

// axis picks a round tick step for values up to v, and the axis maximum, a
// whole number of steps at or above v (never zero, so scales never divide
// by zero).
func axis(v float64) (step, top float64) {
	if v <= 0 || math.IsNaN(v) || math.IsInf(v, 0) {
		return 0.25, 1
	}
	raw := v / 4
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if step = m * mag; step >= raw {
			break
		}
	}
	return step, math.Ceil(v/step-1e-9) * step
}

func num(v float64) string {
	return strconv.FormatFloat(math.Round(v*1000)/1000, 'f', -1, 64)
}

func durLabel(d time.Duration) string {
	if d%time.Second == 0 {
		return fmt.Sprintf("%d s", d/time.Second)
	}
	return fmt.Sprintf("%d ms", d/time.Millisecond)
}
